"""cetnet.plan and ``cetnet plan``: the formulas on small hand-computed cases, the measured
rates reproducing the benchmark they come from, the CLI's output and errors, and
docs/SCALING.md's tables equal to the module's output."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cetnet import plan as P
from cetnet.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "python" / "cetnet" / "configs"

# 1 member, 2 features of 10 and 20 rows, D = 4, global batch 8 on 2 GPUs: B_local = 4,
# C = 8 columns, out = (N - 1) / N = 1/2.
TINY = P.Workload(dims=(4,), vocabs=(10, 20), batch=8, gpus=2, optimizer="sgd")


def test_state_bytes() -> None:
    assert P.state_bytes(10, 64, "sgd", 4) == 0
    assert P.state_bytes(10, 64, "rowwise_adagrad", 4) == 40  # one fp32 per row
    assert P.state_bytes(10, 64, "rowwise_adagrad", 2) == 40  # fp32 also for fp16 weights
    assert P.state_bytes(10, 64, "adam", 4) == 10 * 64 * 12  # 2 fp32 moments + the gradient
    assert P.state_bytes(10, 64, "adam", 2) == 10 * 64 * 10


def test_memory_by_hand() -> None:
    dp, tw, cw, rw = (P.scheme_cost(TINY, s) for s in P.SCHEMES)
    assert (dp.weight_bytes, dp.state_bytes, dp.pieces) == ((10 + 20) * 4 * 4, 0, 2)
    # whole tables: the 320-byte one on rank 0, the 160-byte one on rank 1
    assert (tw.weight_bytes, tw.pieces) == (20 * 4 * 4, 1)
    assert (cw.weight_bytes, cw.pieces) == (20 * 4 * 4, 1)  # D = 4 < 32: one piece
    assert rw.weight_bytes == (5 + 10) * 4 * 4  # ceil(V_f / N) rows of each table
    adagrad = replace(TINY, optimizer="rowwise_adagrad")
    assert P.scheme_cost(adagrad, "row-wise").state_bytes == 4 * (5 + 10)
    assert P.scheme_cost(adagrad, "data-parallel").state_bytes == 4 * 30
    fp16 = replace(TINY, weights_dtype="fp16")
    assert P.scheme_cost(fp16, "data-parallel").weight_bytes == 30 * 4 * 2


def test_column_wise_cuts_wide_tables() -> None:
    wide = P.Workload(dims=(64,), vocabs=(100,), batch=8, gpus=2, optimizer="rowwise_adagrad")
    cw = P.scheme_cost(wide, "column-wise")
    assert (cw.weight_bytes, cw.pieces) == (100 * 32 * 4, 1)  # two 32-column halves
    assert cw.state_bytes == 4 * 100  # each piece keeps its rows' state
    assert P.scheme_cost(wide, "table-wise").weight_bytes == 100 * 64 * 4


def test_communication_by_hand() -> None:
    dp, tw, _, rw = (P.scheme_cost(TINY, s) for s in P.SCHEMES)
    # ids: 4 local rows x 8 bytes x 2 owning GPUs x 1/2 = 32; pooled: 4 x 8 columns x 4 bytes
    # x 1/2 = 64 received, 8 x 4 columns x 4 x 1/2 = 64 sent by an owner; forward + backward
    assert tw.comm_bytes == 32 + 2 * 64
    # ids 4 x 2 features x 8 x 1/2 = 32; reduce-scatter and all-gather of 8 x 8 x 4 x 1/2 = 128
    assert rw.comm_bytes == 32 + 2 * 128
    # the library's all-gather 8 x (8 x 4 + 2 x 8) x 1/2 = 192 beats the touched-row
    # all-reduce 2 x 1/2 x (min(8 x 24, 10 x 16) + min(8 x 24, 20 x 16)) = 352
    assert P.library_gather_bytes(TINY) == 192
    assert P.touched_rows_bytes(TINY) == 160 + 192
    assert dp.comm_bytes == 192
    # tiny tables, big batch: the whole-table all-reduce is cheaper
    big = replace(TINY, batch=64)
    assert P.scheme_cost(big, "data-parallel").comm_bytes == P.touched_rows_bytes(big) == 480
    adam = P.scheme_cost(replace(TINY, optimizer="adam"), "data-parallel")
    assert adam.comm_bytes == 2 * 0.5 * 30 * 4 * 4  # the dense gradient of every table
    one = P.scheme_cost(replace(TINY, batch=4, gpus=1), "table-wise")
    assert (one.comm_bytes, one.comm_s) == (0, 0)


def test_network_times() -> None:
    net = P.Network()
    assert P.all_to_all_seconds(450e9, 2, net) == pytest.approx(1.0)  # NVLink only
    # 16 GPUs, 8 per node: 7/15 of the bytes stay in the node, 8/15 cross at 50 GB/s
    assert P.all_to_all_seconds(15e9, 16, net) == pytest.approx(max(7 / 450, 8 / 50))
    assert P.collective_seconds(450e9, 8, net) == pytest.approx(1.0)
    assert P.collective_seconds(50e9, 16, net) == pytest.approx(1.0)
    assert P.collective_seconds(50e9, 16, P.Network(link_gbit=800)) == pytest.approx(0.5)


def test_kernel_time_by_hand() -> None:
    tw = P.scheme_cost(TINY, "table-wise")
    # the busiest GPU looks up 4 columns for all 8 rows: forward 32 x (4 + 4) bytes, backward
    # 32 x (4 + 2 x 4)
    assert tw.compute_s == pytest.approx(256 / 1766e9 + 384 / 1182e9)
    assert tw.step_s == tw.compute_s + tw.comm_s


@pytest.mark.parametrize("optimizer, measured_ms", [("sgd", 3.2), ("rowwise_adagrad", 5.12)])
def test_rates_reproduce_the_h200_benchmark(optimizer: str, measured_ms: float) -> None:
    """bench/GPU_RESULTS.md (2026-11-29): M = 2, F = 26, 1e6 rows, D = 64, B = 65,536, uniform
    ids, one GPU, cetnet-cuda: the lookup + fused update step took 3.2 ms (SGD) and 5.12 ms
    (row-wise Adagrad)."""
    work = P.Workload(dims=(64, 64), vocabs=(10 ** 6,) * 26, batch=65536, gpus=1,
                      optimizer=optimizer)
    cost = P.scheme_cost(work, "data-parallel")
    assert cost.comm_s == 0
    assert cost.step_s * 1e3 == pytest.approx(measured_ms, rel=0.01)


def test_recommend() -> None:
    choice, why = P.recommend([P.scheme_cost(TINY, s) for s in P.SCHEMES], TINY)
    assert choice == "table-wise" and "fastest that fits" in why
    huge = P.Workload(dims=(64,), vocabs=(10 ** 9,), batch=8, gpus=2)
    result = P.plan(huge)
    assert result.choice is None and "nothing fits in 100 GB per GPU" in result.reason
    fits = P.plan(replace(huge, gpus=4, memory_gb=80))  # row-wise: 64 + 1 GB per GPU
    assert fits.choice == "row-wise"
    assert "table-wise, column-wise" in fits.reason and "exceed 80 GB" in fits.reason


def test_workload_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="optimizer must be one of"):
        replace(TINY, optimizer="adamw")
    with pytest.raises(ValueError, match="dims must be positive"):
        replace(TINY, dims=())


def test_parse_counts() -> None:
    assert P.parse_counts("--vocab", "1e9,10^6,2**3,1_000") == (10 ** 9, 10 ** 6, 8, 1000)
    for bad in ("abc", "1.5", "0", "", "1,,2", "10^99999", "1e30", "inf", "nan", "-3"):
        with pytest.raises(P.ConfigError, match="^--vocab: "):
            P.parse_counts("--vocab", bad)


def test_config_fields() -> None:
    fields = P.config_fields(CONFIGS / "cetnet_dhen_interformer_ml100k.yaml")
    assert fields == {"dims": (16, 16), "optimizer": "rowwise_adagrad", "batch": 512}
    fields = P.config_fields(CONFIGS / "cetnet_ml100k.yaml")
    assert fields == {"dims": (8, 32, 8), "optimizer": "rowwise_adagrad", "batch": 1024}
    assert P.config_fields(CONFIGS / "kdef_ml100k.yaml")["dims"] in ((16,), (16, 16))


def _plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["plan", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _plan(capsys, "--members", "4", "--features", "26", "--vocab", "1e7",
                             "--dim", "64", "--batch", "65536", "--gpus", "8,128,1024")
    assert status == 0 and err == ""
    works = [P.Workload(dims=(64,) * 4, vocabs=(10 ** 7,) * 26, batch=65536, gpus=n)
             for n in (8, 128, 1024)]
    assert out.strip() == P.plan_text(works)
    assert P.HEADER in out and "- 8 GPUs: **table-wise**" in out
    assert "| 1024 | column-wise **←** |" in out


def test_cli_config_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    paper = CONFIGS / "cetnet_dhen_interformer_ml100k.yaml"
    status, out, _ = _plan(capsys, "--config", str(paper),
                           "--vocab", "1682,943", "--gpus", "8", "--weights-dtype", "fp16",
                           "--optimizer", "sgd")
    assert status == 0
    assert ("M = 2 embedding sets x F = 2 features, rows 943-1,682 per table, D = 16, fp16 "
            "weights, sgd, global batch 512") in out
    status, out, _ = _plan(capsys, "--members", "2", "--vocab", "100", "--dim", "8,16",
                           "--batch", "64", "--gpus", "2", "--link-gbps", "200",
                           "--device", "cpu")
    assert status == 0 and "D = 8,16" in out and "EPYC-2core rates" in out
    assert "200 Gb/s between nodes" in out


def test_config_fields_check_the_members_and_dims(tmp_path) -> None:
    """A config whose members and dims do not agree is refused naming the key (``members:
    []`` was planned as two sets; two dims for three members as two sets)."""
    from cetnet.config import dump_config

    for key, value, message in (("members", [], "model.members must be a non-empty list"),
                                ("embedding_dim", [8, 16],
                                 "model.embedding_dim has 2 values for 3 embedding sets")):
        cfg = P.load_config(CONFIGS / "cetnet_ml100k.yaml")
        cfg["model"][key] = value
        path = tmp_path / f"{key}.yaml"
        dump_config(cfg, path)
        with pytest.raises(P.ConfigError, match=message):
            P.config_fields(path)
    cfg = P.load_config(CONFIGS / "cetnet_ml100k.yaml")  # one member by name: a set of one
    cfg["model"].update(members="dnn", embedding_dim=8)
    dump_config(cfg, tmp_path / "one.yaml")
    assert P.config_fields(tmp_path / "one.yaml")["dims"] == (8,)


@pytest.mark.parametrize("argv, message", [
    (["--vocab", "lots", "--dim", "8", "--batch", "8"], "--vocab: expected positive integers"),
    (["--vocab", "10", "--dim", "8,x", "--batch", "8"], "--dim: expected positive integers"),
    (["--vocab", "10", "--dim", "8,16", "--members", "3", "--batch", "8"],
     "--dim has 2 values for --members 3"),
    (["--vocab", "10,20", "--features", "3", "--dim", "8", "--batch", "8"],
     "--vocab has 2 values for --features 3"),
    (["--vocab", "10", "--batch", "8"], "--dim is required without --config"),
    (["--vocab", "10", "--dim", "8"], "--batch is required without --config"),
    (["--vocab", "10", "--dim", "8", "--batch", "0"], "--batch: batch must be a positive"),
    (["--vocab", "10", "--dim", "8", "--batch", "8", "--gpus", "0"], "--gpus: expected positive"),
    (["--vocab", "10", "--dim", "8", "--batch", "8", "--memory-gb", "-1"], "--memory-gb: "),
    (["--vocab", "10", "--dim", "8", "--batch", "8", "--link-gbps", "0"], "--link-gbps: "),
    (["--vocab", "10", "--dim", "8", "--batch", "8", "--ids-per-feature", "0"],
     "--ids-per-feature: "),
    (["--vocab", "10", "--dim", "8", "--batch", "8", "--members", "0"], "--members: "),
    # work that grows with them: bounded far above any cluster or model (1e8 GPUs ran out of
    # memory after 30 s, with a traceback)
    (["--vocab", "10", "--dim", "8", "--batch", "8", "--gpus", "1e8"], "--gpus: at most 100,000"),
    (["--vocab", "10", "--dim", "8", "--batch", "8", "--gpus", "2^63"], "--gpus: at most"),
    (["--vocab", "10", "--features", "100000000", "--dim", "8", "--batch", "8"],
     "--features: at most 100,000"),
    (["--vocab", "10", "--dim", "8", "--members", "5000", "--batch", "8"],
     "--members: at most 1,000"),
    (["--vocab", "10", "--config", "no/such.yaml"], "no/such.yaml"),
])
def test_cli_errors_name_the_flag(capsys: pytest.CaptureFixture[str], argv: list[str],
                                  message: str) -> None:
    status, out, err = _plan(capsys, *argv)
    assert status == 2 and out == ""
    assert err.startswith("cetnet plan: error: ") and message in err
    assert err.count("\n") == 1


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--vocab", "10", "--dim", "8", "--batch", "8", "--optimizer", "adamw"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cetnet plan: error: argument --optimizer: ") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["plan", "--dim", "8"])
    assert "--vocab" in capsys.readouterr().err


def test_scaling_doc_matches_the_module(tmp_path: Path) -> None:
    """docs/SCALING.md's generated tables are plan.py's output (regenerate with
    ``python -m cetnet.plan docs/SCALING.md``)."""
    doc = ROOT / "docs" / "SCALING.md"
    assert P.write_doc(doc, check=True) == []
    stale = tmp_path / "SCALING.md"
    stale.write_text(doc.read_text().replace("| 8 | table-wise **←** |", "| 8 | table-wise |"))
    assert "small" in P.write_doc(stale, check=True)
    assert P.write_doc(stale) and P.write_doc(stale, check=True) == []
    assert stale.read_text() == doc.read_text()
