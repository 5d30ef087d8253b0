"""Zero-shot accuracy through lm-eval: the harness's numbers against an independent computation.

The tasks are small multiple-choice tasks written by the test (JSON lines + a task YAML under
``tmp_path``: tests/evaluation/local_tasks.py); the expected accuracies are recomputed there from
log-likelihoods with plain ``transformers`` calls, one unpadded sequence at a time: sum of
log-softmax of the continuation tokens, argmax over the choices (``acc``) and argmax of the sums
divided by each choice's length in characters (``acc_norm``, lm-eval's definition; ``acc_bytes``
would use UTF-8 bytes). Other runtimes: test_zero_shot_runtimes.py.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from dsnt_export.bench.schema import row_problems  # noqa: E402
from dsnt_export.errors import UserInputError  # noqa: E402
from dsnt_export.evaluation import zero_shot as zs  # noqa: E402
from tests.evaluation.local_tasks import (  # noqa: E402
    TASK,
    direct_scores,
    facts_docs,
    word_docs,
    write_task,
)
from tests.tiny_models import make_sparse_hf_dir, tiny_model, tiny_tokenizer  # noqa: E402


def check_against_direct(scores, expected: dict, n: int) -> None:
    got = {s.metric: s for s in scores}
    assert set(got) == {"acc", "acc_norm"}
    for metric, (value, se) in expected.items():
        assert got[metric].value == pytest.approx(value, abs=1e-12), metric
        assert got[metric].stderr == pytest.approx(se, rel=1e-9), metric
        assert got[metric].n_samples == n


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", seed=3)
    vocab = model.config.vocab_size
    return model, tiny_tokenizer(vocab), vocab


def test_parse_tasks_groups_and_errors():
    assert zs.parse_tasks("dsnot-paper") == list(zs.PAPER_TASKS)
    assert zs.parse_tasks("rte, boolq,rte") == ["rte", "boolq"]
    assert zs.parse_tasks(["arc_easy", "dsnot-paper"])[:2] == ["arc_easy", "boolq"]
    with pytest.raises(UserInputError, match="no task selected"):
        zs.parse_tasks(" , ")


def test_scorer_matches_unbatched_loglikelihoods(tiny):
    model, tok, vocab = tiny
    scorer = zs.LogLikelihoodScorer(model, tok, batch_size=3)
    pairs = [("w5 w6 w7", " w8"), ("w9 ", "w10 w11"), ("", "w12 w13"), ("w4", " w20 w21 w22")]
    got = scorer.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        c, x = scorer.encode_pair(ctx, cont)
        whole = torch.tensor([c + x])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=whole).logits[0].double(), -1)
        pos = range(len(c), len(c) + len(x))
        want = sum(float(logp[t - 1, whole[0, t]]) for t in pos)
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(logp[t - 1].argmax()) == int(whole[0, t]) for t in pos)
    # trailing context whitespace moves to the continuation; an empty context becomes BOS
    assert scorer.encode_pair("w9 ", "w10") == scorer.encode_pair("w9", " w10")
    assert scorer.encode_pair("", "w12")[0] == [tok.bos_token_id]


def test_local_task_accuracy_equals_direct_computation(tiny, tmp_path):
    model, tok, vocab = tiny
    docs = word_docs(40, vocab)
    d = write_task(tmp_path / "tasks", docs)
    scorer = zs.LogLikelihoodScorer(model, tok, batch_size=8)
    manager = zs.task_manager(d, [TASK])
    scores, res = zs.evaluate_model(scorer, [TASK], manager=manager)
    check_against_direct(scores, direct_scores(model, tok, docs), len(docs))
    assert scores[0].task_version == 3.0
    # --limit: the first N documents only
    scores, _ = zs.evaluate_model(scorer, [TASK], manager=manager, limit=10)
    check_against_direct(scores, direct_scores(model, tok, docs[:10]), 10)


def test_same_numbers_as_lm_evals_own_hf_model(tiny, tmp_path):
    """lm-eval's HFLM wrapping the same model object gives the same accuracies as our LM."""
    from lm_eval.models.huggingface import HFLM

    model, tok, vocab = tiny
    docs = word_docs(16, vocab, seed=11)
    manager = zs.task_manager(write_task(tmp_path / "tasks", docs), [TASK])
    ours, _ = zs.evaluate_model(
        zs.LogLikelihoodScorer(model, tok, batch_size=5), [TASK], manager=manager
    )
    tasks = zs.load_tasks([TASK], manager)
    for task in tasks["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    from lm_eval.evaluator import evaluate

    res = evaluate(
        lm=HFLM(pretrained=model, tokenizer=tok, batch_size=4),
        task_dict=tasks,
        bootstrap_iters=0,
        log_samples=False,
    )
    theirs = res["results"][TASK]
    assert {s.metric: s.value for s in ours} == {
        m: theirs[f"{m},none"] for m in ("acc", "acc_norm")
    }


def test_evaluate_dir_dense_vs_sparse_rows_and_figure(tmp_path):
    sparse = make_sparse_hf_dir(tmp_path / "run" / "hf", "llama", pattern="2:4", seed=0)
    cfg = json.loads((sparse / "config.json").read_text())
    dense = tmp_path / "dense"
    tiny_model("llama", seed=0, vocab=cfg["vocab_size"]).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    docs = word_docs(24, min(cfg["vocab_size"], len(tiny_tokenizer())), seed=5)
    d = write_task(tmp_path / "tasks", docs)

    # the CLI; the manifest names "tiny-random-llama", which is nowhere: a skipped dense row
    from dsnt_export.bench.timing import read_rows
    from dsnt_export.cli import main

    argv = ["eval", str(tmp_path / "run"), "--tasks", TASK, "--task-dir", str(d), "--limit", "2"]
    assert main([*argv, "--device", "cpu", "--batch-size", "3"]) == 0
    out = tmp_path / "run" / "eval"  # the default: RUN/eval, outside the hf/ artifact
    rows = read_rows(out / "zero_shot.jsonl")
    assert [r["status"] for r in rows].count("skipped") == 1
    assert "--dense" in next(r["reason"] for r in rows if r["status"] == "skipped")
    assert {r["n_samples"] for r in rows if r["status"] == "ok"} == {2}
    assert (out / "zero_shot_acc.png").is_file() and (out / "zero_shot_acc_norm.png").is_file()

    rows = zs.evaluate_dir(
        tmp_path / "run", TASK, dense=dense, task_dir=d, device="cpu", batch_size=4
    )
    assert all(not row_problems(r) for r in rows), [row_problems(r) for r in rows]
    assert {(r["variant"], r["metric"]) for r in rows} == {
        (v, m) for v in ("dense", "sparse") for m in ("acc", "acc_norm")
    }
    assert len({r["run_id"] for r in rows}) == 1
    from importlib.metadata import version

    assert all(r["harness"] == {"name": "lm-eval", "version": version("lm_eval")} for r in rows)
    assert all(r["task_version"] == 3.0 and r["n_samples"] == len(docs) for r in rows)
    from dsnt_export.hf_io import load_model, load_tokenizer

    for variant, path in (("dense", dense), ("sparse", sparse)):
        m = load_model(str(path), torch.float32)
        want = direct_scores(m, load_tokenizer(str(path)), docs)
        for r in rows:
            if r["variant"] == variant:
                assert r["value"] == pytest.approx(want[r["metric"]][0], abs=1e-12)
    png = zs.plot_rows(rows, tmp_path / "run" / "eval" / "zero_shot.png")
    assert png is not None and png.stat().st_size > 1000
    assert zs.plot_rows(rows, tmp_path / "none.png", metric="f1") is None


def test_offline_hub_task_error_names_task_dataset_and_fix(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    d = write_task(tmp_path / "tasks", [], name="hub_only_task", hub="dsnt-export-absent/hub-only")
    manager = zs.task_manager(d, ["hub_only_task"])
    with pytest.raises(UserInputError) as e:
        zs.load_tasks(["hub_only_task"], manager)
    msg = str(e.value)
    for part in (
        "'hub_only_task'",
        "dsnt-export-absent/hub-only",
        "--task-dir",
        "dataset_path: json",
        "data_files",
    ):
        assert part in msg, (part, msg)
    with pytest.raises(UserInputError, match="unknown lm-eval task 'no_such_task'"):
        zs.load_tasks(["no_such_task"], manager)


def test_missing_harness_and_generation_give_clear_errors(tiny, monkeypatch):
    model, tok, _ = tiny
    lm = zs.as_lm(zs.LogLikelihoodScorer(model, tok))
    with pytest.raises(UserInputError, match="generate_until"):
        lm.generate_until([])
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserInputError, match=r"lm-eval>=0.4"):
        zs.harness_version()


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_model_local_task_equals_direct_computation(tmp_path):
    from dsnt_export.embedded import embedded_model_dir
    from dsnt_export.hf_io import load_model, load_tokenizer

    src = str(embedded_model_dir(progress=False))
    model, tok = load_model(src, torch.float32), load_tokenizer(src)
    docs = facts_docs()
    d = write_task(tmp_path / "tasks", docs, text="Question: {{question}}\nAnswer:")
    scorer = zs.LogLikelihoodScorer(model, tok, batch_size=8)
    scores, _ = zs.evaluate_model(scorer, [TASK], manager=zs.task_manager(d, [TASK]))
    docs_ctx = [{**x, "question": f"Question: {x['question']}\nAnswer:"} for x in docs]
    check_against_direct(scores, direct_scores(model, tok, docs_ctx), len(docs))
    # a real model knows many of these: above chance (about 26 % with 3-4 choices); measured
    # 0.567 for the dense embedded model
    assert next(s.value for s in scores if s.metric == "acc") > 0.4


def test_the_shipped_offline_example_task_runs_from_the_checkout(tmp_path, monkeypatch):
    """examples/zero_shot (the README's offline zero-shot example) is the tests' facts task, and
    `dsnt-export eval RUN --tasks dsnt_facts_mc --task-dir examples/zero_shot` scores it from the
    checkout's root."""
    from pathlib import Path

    from dsnt_export.bench.timing import read_rows
    from dsnt_export.cli import main
    from tests.evaluation.local_tasks import facts_docs

    root = Path(__file__).resolve().parents[2]
    ex = root / "examples" / "zero_shot"
    shipped = [json.loads(x) for x in (ex / "dsnt_facts_mc.jsonl").read_text().splitlines()]
    assert shipped == facts_docs()
    made = write_task(tmp_path / "made", facts_docs(), name="dsnt_facts_mc")
    body = (made / "dsnt_facts_mc.yaml").read_text()
    body = body.replace(
        json.dumps(str(made / "dsnt_facts_mc.jsonl")), '"examples/zero_shot/dsnt_facts_mc.jsonl"'
    )
    shipped_yaml = (ex / "dsnt_facts_mc.yaml").read_text()
    assert "\n".join(x for x in shipped_yaml.splitlines() if not x.startswith("#")) + "\n" == body

    make_sparse_hf_dir(tmp_path / "run" / "hf", "llama", pattern="2:4", seed=0)
    monkeypatch.chdir(root)
    argv = ["eval", str(tmp_path / "run"), "--tasks", "dsnt_facts_mc", "--task-dir", str(ex)]
    assert main([*argv, "--limit", "3", "--device", "cpu"]) == 0
    rows = read_rows(tmp_path / "run" / "eval" / "zero_shot.jsonl")
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["task"] for r in ok} == {"dsnt_facts_mc"} and {r["n_samples"] for r in ok} == {3}
