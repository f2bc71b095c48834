"""Every ``sglp`` subcommand on a tiny model directory: exit code, printed numbers, written files."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf
from pipeline_models import one_thread, save_tiny  # noqa: F401

from sglp_fast.cli import _analyze_kwargs, build_parser, configure_logging, main, parse_size
from sglp_fast.calibration.text import load_calibration
from sglp_fast.evaluate import count_parameters, perplexity
from sglp_fast.plan import Plan
from sglp_fast.selection.compensation import fold_state_tensor
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--calib-seqs", "3", "--seq-len", "16", "-q"]
EVAL = ["--eval-seqs", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("cli") / "tiny", "llama", layers=6))


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text}"
    return m.groups()


def _eval_ppl(model, tokenizer_dir, seqs=2, seq_len=16):
    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = load_calibration("builtin:heldout", tok, n_seqs=seqs, seq_len=seq_len).input_ids
    return perplexity(model, ids).perplexity


def test_prune_prints_and_saves(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc, text, err = run(capsys, "prune", model_dir, "--remove", 2, *FAST, *EVAL, "--output", out)
    assert rc == 0, err
    before, after = _number(r"parameters: ([\d,]+) .* -> ([\d,]+)", text)
    original = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pruned = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert int(before.replace(",", "")) == count_parameters(original)
    assert int(after.replace(",", "")) == count_parameters(pruned)
    p_before, p_after = (float(x) for x in _number(r"held-out perplexity .*: ([\d.]+) -> ([\d.]+)", text))
    assert p_before == pytest.approx(_eval_ppl(original, model_dir), rel=1e-4)
    assert p_after == pytest.approx(_eval_ppl(pruned, out), rel=1e-4)
    plan = Plan.load(out / "plan.json")
    assert f"removed blocks (2 of 6, scorer verified): {plan.removed}" in text
    sel = plan.extra["selection"]
    assert f"verified: kept the '{sel['picked']}' plan" in text
    for name, c in sel["candidates"].items():  # every checked candidate's loss is printed
        if c.get("calib_loss") is not None:
            assert f"{name} {c['calib_loss']:.4f}" in text
        elif "skipped" not in c:  # compensated only (plain_checks "band")
            assert f"{name} (plain not checked) (compensated {c['calib_loss_compensated']:.4f})" in text
    assert plan.removed == sel["candidates"][sel["picked"]]["removed"]
    for i, rem in enumerate(plan.removed_per_segment()):
        assert f"segment {i + 1}: blocks" in text and f"removed {len(rem)}: {rem}" in text
    assert "wall time:" in text and "saved:" in text

    rc, _, err = run(capsys, "prune", model_dir, "--remove", 2, *FAST, "--no-eval", "--output", out)
    assert rc == 2 and "not empty; pass --overwrite" in err
    rc, text, err = run(capsys, "prune", model_dir, "--ratio", 0.5, "--segments", 1, "--scorer", "block_influence",
                        *FAST, "--no-eval", "--output", out, "--overwrite")
    assert rc == 0, err
    plan = Plan.load(out)
    assert plan.k == 1 and plan.scorer == "block_influence" and len(plan.removed) == 3
    bi = plan.scores["block_influence"]
    assert plan.removed == sorted(sorted(range(6), key=lambda i: (bi[i], i))[:3])
    assert "held-out perplexity" not in text


def test_prune_ratio_of_params_and_protection(model_dir, tmp_path, capsys):
    rc, text, err = run(capsys, "prune", model_dir, "--ratio", 0.3, "--ratio-of", "params", "--protect-first", 1,
                        "--protect-last", 1, *FAST, "--no-eval", "--output", tmp_path / "o")
    assert rc == 0, err
    plan = Plan.load(tmp_path / "o")
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert len(plan.removed) == int(np.floor(0.3 * count_parameters(model) / per_block + 0.5))
    assert 0 not in plan.removed and 5 not in plan.removed
    assert plan.budget["ratio_of"] == "params"


def test_prune_lazy_streams_the_checkpoint(model_dir, tmp_path, capsys):
    rc, text, err = run(capsys, "prune", model_dir, "--remove", 2, "--lazy", *FAST, "--output", tmp_path / "lz")
    assert rc == 0, err
    assert "streamed):" in text  # the perplexity, block by block like the calibration (issue 12)
    plan = Plan.load(tmp_path / "lz")
    rc, _, err = run(capsys, "analyze", model_dir, "--remove", 2, *FAST, "--json", tmp_path / "eager.json")
    eager = Plan.load(tmp_path / "eager.json")
    assert plan.removed == eager.removed and plan.segments == eager.segments
    np.testing.assert_allclose(plan.cka, eager.cka, rtol=1e-6, atol=1e-7)
    ref = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    keep = [i for i in range(6) if i not in plan.removed]
    got = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "lz").state_dict()
    maps = plan.transforms or {}
    for new, old in enumerate(keep):
        for name, t in ref.model.layers[old].state_dict().items():
            folded = old in maps and name == "mlp.down_proj.weight"  # the map folded in as the block streamed
            if folded:  # the plan file holds the map in float32, the prune folded the float64 one: 1e-6
                t = fold_state_tensor("linear", "weight", t, maps[old])
            torch.testing.assert_close(got[f"model.layers.{new}.{name}"], t, rtol=1e-6 if folded else 0,
                                       atol=1e-7 if folded else 0)


def test_prune_encoder_skips_perplexity(tmp_path, capsys):
    src = save_tiny(tmp_path / "bert", "bert", layers=4)
    rc, text, err = run(capsys, "prune", src, "--remove", 1, *FAST, "--calib-seqs", 6, "--output", tmp_path / "o")
    assert rc == 0, err
    assert "perplexity: skipped (an encoder" in text
    model = tf.AutoModel.from_pretrained(tmp_path / "o")
    assert model.config.num_hidden_layers == 3 and len(model.encoder.layer) == 3
    # a sentence-embedding encoder's loss has one term per window: the search checks every window
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["selection"]["verify_windows"] == plan["calibration"]["n_seqs"] > 4
    rc, text, err = run(capsys, "prune", src, "--remove", 1, *FAST, "--calib-seqs", 6, "--verify-windows", 2,
                        "--output", tmp_path / "o2")
    assert rc == 0, err
    assert json.loads((tmp_path / "o2" / "plan.json").read_text())["selection"]["verify_windows"] == 2


def test_analyze_json(model_dir, tmp_path, capsys):
    rc, text, err = run(capsys, "analyze", model_dir, *FAST, "--json", tmp_path / "a.json",
                        "--heatmap", tmp_path / "a.png", "--scorer", "gradnorm")
    assert rc == 0, err
    d = json.loads((tmp_path / "a.json").read_text())
    assert np.asarray(d["cka"]).shape == (6, 6) and d["k"] == len(d["segments"])
    assert len(d["scores"]["gradnorm"]) == 6 and "removed" not in d
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert "scores[gradnorm]: least important first:" in text
    rc, text, err = run(capsys, "analyze", model_dir, *FAST, "--remove", 2, "--json", tmp_path / "b.json")
    assert rc == 0, err
    d = json.loads((tmp_path / "b.json").read_text())
    assert len(d["removed"]) == 2 and d["removed"] == sorted(d["removed"]) and d["budget"]["remove"] == 2
    assert d["scorer"] == "verified" and "gradnorm" not in d["scores"]  # the default runs no backward


def test_apply_plan(model_dir, tmp_path, capsys):
    rc, _, err = run(capsys, "prune", model_dir, "--remove", 3, *FAST, "--no-eval", "--output", tmp_path / "p")
    assert rc == 0, err
    rc, text, err = run(capsys, "apply", tmp_path / "p" / "plan.json", model_dir, *EVAL, "--seq-len", 16,
                        "--output", tmp_path / "a")
    assert rc == 0, err
    assert "held-out perplexity" in text and "saved:" in text
    a = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "p").state_dict()
    b = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rc, _, err = run(capsys, "apply", tmp_path / "p", model_dir, "--lazy", "--output", tmp_path / "s")
    assert rc == 0, err
    s = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    assert all(torch.equal(a[k], s[k]) for k in a)
    # refused: the plan on its own output (already pruned), a corrupted plan, an existing output
    rc, _, err = run(capsys, "apply", tmp_path / "p", tmp_path / "p", "--no-eval", "--output", tmp_path / "x")
    assert rc == 2 and "made for a model with 6 blocks" in err
    bad = tmp_path / "bad.json"
    bad.write_text((tmp_path / "p" / "plan.json").read_text()[:100])
    rc, _, err = run(capsys, "apply", bad, model_dir, "--output", tmp_path / "y")
    assert rc == 2 and "not valid JSON" in err
    rc, _, err = run(capsys, "apply", tmp_path / "p", model_dir, "--no-eval", "--output", tmp_path / "a")
    assert rc == 2 and "--overwrite" in err


def test_eval(model_dir, capsys):
    rc, text, err = run(capsys, "eval", model_dir, "--eval-seqs", 2, "--seq-len", 16)
    assert rc == 0, err
    (ppl,) = _number(r"perplexity \(builtin:heldout, 2 x 16 tokens\): ([\d.]+)", text)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert float(ppl) == pytest.approx(_eval_ppl(model, model_dir), rel=1e-4)
    rc, _, err = run(capsys, "eval", model_dir, "--text", "/no/such/file.txt")
    assert rc == 2 and "not a file" in err


def test_compare(model_dir, tmp_path, capsys):
    rc, text, err = run(capsys, "compare", model_dir, "--remove", 1, 2, *FAST, *EVAL,
                        "--markdown", tmp_path / "c.md", "--json", tmp_path / "c.json")
    assert rc == 0, err
    md = (tmp_path / "c.md").read_text()
    for m in ("sglp-gradnorm", "sglp-relative_update", "shortgpt", "angular", "replaceme", "last", "random"):
        assert f"| {m} |" in md and f"| {m} |" in text
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert len(rows) == 2 * 10 and rows[0]["method"] == "sglp-verified"
    for n in (1, 2):  # ReplaceMe: Gromov's run, plus a map unless the run starts at block 0
        rm, ang = (next(r for r in rows if r["method"] == m and r["remove"] == n) for m in ("replaceme", "angular"))
        assert rm["removed"] == ang["removed"] and rm["compensated"] == (ang["removed"][0] > 0)
    last = next(r for r in rows if r["method"] == "last" and r["remove"] == 2)
    assert last["removed"] == [4, 5]
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    del model.model.layers[4:6]
    model.config.num_hidden_layers = 4
    assert last["perplexity"] == pytest.approx(_eval_ppl(model, model_dir), rel=1e-4)  # independent re-computation
    rc, _, err = run(capsys, "compare", model_dir, "--remove", 6, *FAST)
    assert rc == 2 and "remove: expected an int in [0, 5]" in err


def test_bench(model_dir, tmp_path, capsys):
    rc, text, err = run(capsys, "bench", model_dir, *FAST, "--json", tmp_path / "b.json")
    assert rc == 0, err
    d = json.loads((tmp_path / "b.json").read_text())
    assert d["tokens"] == 48 and d["tokens_per_s"] > 0 and d["peak_memory_bytes"] > 0
    assert "calibration throughput:" in text and "peak memory:" in text


@pytest.mark.parametrize("cmd", ["prune", "analyze", "apply", "eval", "compare", "bench"])
def test_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "sglp prune --ratio 0.25" in out


@pytest.mark.parametrize("argv", [
    ["prune", "--output", "x"],  # no budget
    ["prune", "--remove", "2", "--ratio", "0.1", "--output", "x"],
    ["prune", "--remove", "2"],  # no output
    ["analyze", "--segments", "0"],
    ["analyze", "--segments", "many"],
    ["analyze", "--calib-seqs", "0"],
    ["analyze", "--max-memory", "lots"],
    ["analyze", "--scorer", "magnitude"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_values_exit_2(model_dir, tmp_path, capsys):
    rc, _, err = run(capsys, "prune", model_dir, "--remove", 6, *FAST, "--output", tmp_path / "o")
    assert rc == 2 and "remove: expected an int in [0, 5]" in err
    rc, _, err = run(capsys, "analyze", model_dir, "--calib", tmp_path / "nope.txt", *FAST[-1:])
    assert rc == 2 and "calib:" in err
    rc, _, err = run(capsys, "analyze", tmp_path / "missing-model", *FAST)
    assert rc == 2 and "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_parse_size_and_defaults():
    assert parse_size("8GiB") == 8 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size("1e9") == 10**9
    args = build_parser().parse_args(["prune", "--ratio", "0.25", "--output", "o"])
    assert args.model is None and args.calib == "builtin" and (args.calib_seqs, args.seq_len) == (16, 256)
    assert args.segments == "auto" and args.scorer == "verified" and args.eval_text == "builtin:heldout"
    assert args.compensate is None and (args.verify_windows, args.shortlist) == (None, 4)
    assert build_parser().parse_args(["prune", "--ratio", "0.25", "--output", "o", "--no-compensate"]).compensate is False
    assert args.greedy is None
    for flag, value in (("--greedy", True), ("--no-greedy", False)):
        assert build_parser().parse_args(["prune", "--ratio", "0.25", "--output", "o", flag]).greedy is value
    assert _analyze_kwargs(build_parser().parse_args(["prune", "--ratio", "0.25", "--output", "o", "--greedy"]))["greedy"]


def test_windows_per_call_and_prefetch_flags_reach_calibration(monkeypatch, capsys):
    """--windows-per-call / --prefetch go through analyze() to the preflight and to calibrate (automatic when
    not given); a bad value is a usage error."""
    kw = _analyze_kwargs(build_parser().parse_args(["prune", "--ratio", "0.25", "--output", "o"]))
    assert kw["windows_per_call"] is None and kw["prefetch"] is None
    for flag, value in (("on", True), ("off", False), ("auto", None)):
        args = build_parser().parse_args(["prune", "--ratio", "0.25", "--output", "o", "--windows-per-call", "3",
                                          "--prefetch", flag])
        assert _analyze_kwargs(args)["windows_per_call"] == 3 and _analyze_kwargs(args)["prefetch"] is value
    import sglp_fast.api as api

    seen = {}
    real = api.calibrate

    def spy(*a, **k):
        seen.update(windows_per_call=k["windows_per_call"], prefetch=k["prefetch"])
        return real(*a, **k)
    monkeypatch.setattr(api, "calibrate", spy)
    model = tiny_model("llama", layers=3, seed=2)
    api.analyze(model, tiny_batches_ids(), windows_per_call=2, prefetch=False, scorer="block_influence", seq_len=12)
    assert seen == {"windows_per_call": 2, "prefetch": False}
    with pytest.raises(ValueError, match="windows_per_call"):
        api.analyze(model, tiny_batches_ids(), windows_per_call=0)
    with pytest.raises(TypeError, match="prefetch"):
        api.analyze(model, tiny_batches_ids(), prefetch="yes")
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", "--windows-per-call", "0"])
    assert exit_.value.code == 2 and "--windows-per-call: expected a positive int" in capsys.readouterr().err


def tiny_batches_ids():
    return torch.randint(0, 90, (4, 12), generator=torch.Generator().manual_seed(0))


def test_diagnostics_go_to_stderr_through_logging(capsys):
    package_log = logging.getLogger("sglp_fast")
    before = list(package_log.handlers)
    try:
        for _ in range(2):  # idempotent: one handler however often main() runs
            configure_logging(quiet=False)
        logging.getLogger("sglp_fast.calibration.runtime").info("calibrated %d blocks", 6)
        cap = capsys.readouterr()
        assert cap.err == "calibrated 6 blocks\n" and cap.out == ""
        configure_logging(quiet=True)  # -q: warnings only
        logging.getLogger("sglp_fast.cli").info("progress")
        logging.getLogger("sglp_fast.cli").warning("careful")
        assert capsys.readouterr().err == "careful\n"
        assert sum(type(h).__name__ == "_StderrHandler" for h in package_log.handlers) == 1
    finally:
        package_log.handlers[:] = before


def test_console_script_entry_point():
    exe = os.path.join(os.path.dirname(sys.executable), "sglp")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "sglp_fast.cli"]
    r = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("sglp-fast ")


def test_compensation_flags_reach_the_plan(model_dir, tmp_path, capsys):
    """--folds, --fit-windows, --self-fit-windows, --self-fit-len and --map-policy: the plan records them (the
    text fit windows and the shorter sampled ones in one analysis); bad values are refused by argparse, or by
    the library with the flag's name."""
    rc, _, err = run(capsys, "prune", model_dir, "--remove", 2, "--calib-seqs", 4, "--seq-len", 16, "-q",
                     "--folds", 2, "--fit-windows", 2, "--self-fit-windows", 3, "--self-fit-len", 6,
                     "--map-policy", "fixed", "--no-eval",
                     "-o", tmp_path / "o", "--json", tmp_path / "p.json")
    assert rc == 0, err
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["calibration"]["fit_only_windows"] == 2 and plan["calibration"]["n_seqs"] == 4
    assert plan["calibration"]["self_fit_windows"] == 3 and plan["selection"]["self_fit_windows"] == 3
    assert plan["calibration"]["self_fit_len"] == 6 and plan["selection"]["self_fit_len"] == 6
    sel = plan["selection"]
    assert sel["verify_windows"] == 4  # every calibration window, cross-fitted; the fit-only ones are not checked
    comp = plan.get("compensation")
    assert comp is None or (comp["policy"], comp["folds"], comp["fit_only_windows"], comp["self_fit_windows"],
                            comp["fit_windows"]) == ("fixed", 2, 2, 3, 9)
    rc, _, err = run(capsys, "analyze", model_dir, "--no-compensate", "--self-fit-windows", 2, *FAST)
    assert rc == 2 and "--self-fit-windows" in err and "self_fit_windows" not in err, err
    rc, _, err = run(capsys, "analyze", model_dir, "--no-compensate", "--self-fit-len", 8, *FAST)
    assert rc == 2 and "--self-fit-len" in err and "self_fit_len" not in err, err
    for bad, words in ((["--folds", "0"], ("--folds", "positive")),
                       (["--map-policy", "ridge"], ("--map-policy",)),
                       (["--self-fit-len", "1"], ("--self-fit-len", ">= 2"))):
        with pytest.raises(SystemExit) as exit_:
            main(["analyze", model_dir, *bad, *FAST])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and all(w in err for w in words)
