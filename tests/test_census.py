"""``achilles census``: the bundled models plus a tiny model of every architecture, through the
local process pool and through submitit's local executor, with a job killed mid-way; bad input;
a model failing mid-census."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import ARCHS, TEXT, make_model

from achilles.cli import main
from achilles.config import IdentifyConfig, ModelSpec, RankConfig
from achilles.errors import AchillesError
from achilles.results.guard import make_dir
from achilles.scale.census import CensusSettings, read_model_list, run_census
from achilles.scale.census.launch import _init_worker, gpu_groups, run_slurm
from achilles.scale.census.run import (
    DONE_FILE,
    Task,
    check_resumable,
    collect,
    model_key,
    run_dir_of,
    run_task,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--samples", "4", "--keep", "100", "--max-neurons", "20", "--no-report", "--quiet"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer) -> Path:  # noqa: ANN001
    """Tiny random models of every architecture, a model with corrupt weights, a text."""
    root = tmp_path_factory.mktemp("zoo")
    for arch in ARCHS:
        make_model(arch).save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
    broken = root / "broken"
    make_model("llama").save_pretrained(broken)
    tokenizer.save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return root


def _list(path: Path, lines: list[str]) -> Path:
    path.write_text("# census list\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def _all_models(zoo: Path) -> list[str]:
    return [str(ROOT / "models" / "sink"), f"{ROOT / 'models' / 'natural'} --dtype float32",
            *(str(zoo / a) for a in ARCHS)]


def _markers(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob(f"*/{DONE_FILE}")}


def _settings() -> CensusSettings:
    return CensusSettings(TEXT, RankConfig(samples=4, keep=100), IdentifyConfig(max_neurons=20), report=False)


def _check_summary(out: Path, n: int) -> list[dict]:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "census" and summary["complete"] and len(summary["rows"]) == n
    assert (out / "summary.csv").read_text().count("\n") == n + 1
    md = (out / "summary.md").read_text()
    assert md.count("](runs/") == n
    for fig in ("depth.png", "scale.png"):
        assert (out / "figures" / fig).stat().st_size > 10_000
    rows = {r["name"]: r for r in summary["rows"]}
    sink = rows["sink"]  # the bundled model with a planted critical set
    assert sink["n_star"] is not None and sink["delta_critical"] >= 1.0
    assert sink["n_units_total"] == sink["pool_units"] * sink["tokens"]
    assert sink["ratio"] == pytest.approx(sink["n_star"] / sink["n_units_total"])
    return summary["rows"]


def test_local_launcher_killed_then_resumed(zoo, tmp_path) -> None:  # noqa: ANN001
    models = _list(tmp_path / "models.txt", _all_models(zoo))
    out = tmp_path / "census"
    argv = ["census", "--models", str(models), "--text-file", str(zoo / "text.txt"),
            "--out-dir", str(out), *FAST]
    proc = subprocess.Popen(
        [sys.executable, "-m", "achilles", *argv, "--jobs", "1"], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:  # kill the whole census (pool and worker) once one model is done, another under way
        deadline = time.monotonic() + 240
        while not _markers(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        mid = time.monotonic() + 10
        while time.monotonic() < mid and proc.poll() is None:
            dirs = {p.name for p in (out / "runs").iterdir() if not p.name.startswith(".")}
            if dirs - set(_markers(out)):
                break
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _markers(out)
    entries = read_model_list(str(models))
    assert 1 <= len(done) < len(entries), "the kill came too late to test resumption"
    before = {r["name"]: r["status"] for r in collect(out, entries)}
    assert {s for n, s in before.items() if n not in done} <= {"interrupted", "missing"}

    assert main([*argv, "--jobs", "2"]) == 0
    after = _markers(out)
    assert set(after) == {e.name for e in entries}
    assert all(after[n] == done[n] for n in done), "a finished model was run again"
    rows = _check_summary(out, len(entries))
    assert {r["model_type"] for r in rows} >= set(ARCHS)


def test_slurm_launcher_through_submitit_local_executor(zoo, tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("submitit")
    models = _list(tmp_path / "models.txt", [str(ROOT / "models" / "sink"), str(zoo / "gpt2"),
                                             str(zoo / "broken")])
    entries = read_model_list(str(models))
    out = tmp_path / "census"
    settings = _settings()
    tasks = [Task(e, str(run_dir_of(out, e))) for e in entries[:2]]  # the failing one later
    jobs = run_slurm(tasks, settings, folder=out / "slurm", gpus=[0] * len(tasks),
                     cluster="local", wait=False)
    sink_dir = Path(tasks[0].run_dir)
    try:  # cancel the sink model's job while it runs
        deadline = time.monotonic() + 240
        while not sink_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not (sink_dir / DONE_FILE).exists()
        jobs[0].cancel()
        for job in jobs[1:]:
            job.wait()
    finally:
        for job in jobs:
            if not job.done():
                job.cancel()
    # submitit raises for a job killed outright; a run stopped by SIGTERM ends cleanly
    # unfinished (no completion marker): either way the cancelled model is not done
    with contextlib.suppress(Exception):
        jobs[0].result()
    # on a loaded box the sink job can finish between the check above and the cancel: then it
    # is a finished run (its completion marker written last), and the resume skips it too
    cancelled = not (sink_dir / DONE_FILE).exists()
    done = _markers(out)
    assert set(done) == ({"gpt2"} if cancelled else {"gpt2", "sink"})

    result = run_census(entries, settings, out, launcher="slurm", slurm={"cluster": "local"})
    # the cancelled one (if it was) and the failing one run; the finished ones are skipped
    assert (result.ran, result.skipped) == ((2, 1) if cancelled else (1, 2))
    assert all(_markers(out)[n] == t for n, t in done.items())
    rows = {r["name"]: r for r in result.rows}
    assert rows["broken"]["status"] == "failed" and rows["broken"]["error"]
    assert json.loads((out / "runs" / "broken" / "census_error.json").read_text())["traceback"]
    assert all(rows[n]["status"] == "ok" for n in ("sink", "gpt2"))
    assert not result.complete
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["complete"] and len(summary["rows"]) == 3
    assert "**failed**" in (out / "summary.md").read_text()


@pytest.mark.slow  # a process pool of its own; the submitit test covers the library path
def test_failing_model_is_reported_not_fatal(zoo, tmp_path, capsys) -> None:  # noqa: ANN001
    models = _list(tmp_path / "m.txt", [str(zoo / "broken"), str(zoo / "gpt_neox")])
    argv = ["census", "--models", str(models), "--text-file", str(zoo / "text.txt"),
            "--out-dir", str(tmp_path / "c"), *FAST]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "1 of 2 models done" in out and "broken: failed:" in out
    assert (tmp_path / "c" / "runs" / "gpt_neox" / DONE_FILE).is_file()


def test_interrupted_folder_restarts_cleanly(zoo, tmp_path) -> None:  # noqa: ANN001
    (entry,) = read_model_list(str(_list(tmp_path / "m.txt", [str(zoo / "qwen2")])))
    run_dir = tmp_path / "runs" / entry.name
    make_dir(run_dir, "census", model=model_key(entry))  # as run_task makes it
    (run_dir / "ranking.json").write_text("{half a file")  # what a kill leaves behind
    row = run_task(Task(entry, str(run_dir)), _settings())
    assert row["status"] == "ok"
    assert json.loads((run_dir / "ranking.json").read_text())["kind"] == "ranking"
    stamp = (run_dir / DONE_FILE).stat().st_mtime_ns
    assert run_task(Task(entry, str(run_dir)), _settings()) == row  # done: skipped
    assert (run_dir / DONE_FILE).stat().st_mtime_ns == stamp
    # resuming with other settings is refused instead of mixing results
    check_resumable(run_dir, entry, _settings())
    other = CensusSettings(TEXT, RankConfig(samples=5, keep=100), IdentifyConfig(max_neurons=20), report=False)
    with pytest.raises(AchillesError, match=r"rank\.samples differ"):
        check_resumable(run_dir, entry, other)


def test_model_list_options_and_names(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(ROOT)
    path = _list(tmp_path / "m.txt", [
        "models/sink --dtype bfloat16", "org/model-a  # a comment", "org/model-a --name second",
        "models/sink",
    ])
    e = read_model_list(str(path))
    assert [x.name for x in e] == ["sink", "org__model-a", "second", "sink-2"]
    assert e[0].spec.dtype == "bfloat16" and e[3].spec.dtype == ModelSpec(model="x").dtype
    paper = read_model_list("paper21")
    assert len(paper) == 21 and paper[6].spec.model == "Qwen/Qwen2.5-72B-Instruct"


def test_gpu_groups_and_worker_assignment() -> None:
    assert gpu_groups(["0", "1", "2", "3", "4"], 2) == [["0", "1"], ["2", "3"]]
    assert gpu_groups(["0"], 1) == [["0"]]
    with pytest.raises(AchillesError, match="needs 3 GPUs but only 2"):
        gpu_groups(["0", "1"], 3)
    q: queue.Queue = queue.Queue()
    q.put("2,3")
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        _init_worker(q)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (["# nothing here"], [], "is empty"),
        (["models/sink", "./models/no-such-model"], [], "model path not found"),
        (["models/sink --dtype float64"], [], "m.txt:2:"),
        (["models/sink"], ["--launcher", "slurm"], "needs submitit"),
        (["models/sink", "models/na\x00tural"], [], "m.txt:3: holds a NUL byte"),
    ],
)
def test_bad_input_one_line_exit_2(lines, extra, message, tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    out = tmp_path / "out"
    argv = ["census", "--models", str(_list(tmp_path / "m.txt", lines)), "--text", TEXT,
            "--out-dir", str(out), *FAST, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_unwritable_out_dir(tmp_path, capsys) -> None:  # noqa: ANN001
    blocker = tmp_path / "file"
    blocker.write_text("x")
    models = _list(tmp_path / "m.txt", [str(ROOT / "models" / "sink")])
    assert main(["census", "--models", str(models), "--text", TEXT,
                 "--out-dir", str(blocker / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0]


def test_missing_list_and_unknown_hub_model(tmp_path, capsys) -> None:  # noqa: ANN001
    assert main(["census", "--models", str(tmp_path / "none.txt"), "--text", TEXT,
                 "--out-dir", str(tmp_path / "o")]) == 2
    assert "model list not found" in capsys.readouterr().err
    # offline, the shipped list's hub ids cannot be resolved: refused before any work
    assert main(["census", "--models", "paper21", "--text", TEXT, "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Qwen2.5-0.5B-Instruct" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # one process per model: every architecture through submitit's local executor
def test_slurm_launcher_every_architecture(zoo, tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("submitit")
    entries = read_model_list(str(_list(tmp_path / "models.txt", _all_models(zoo))))
    out = tmp_path / "census"
    result = run_census(entries, _settings(), out, launcher="slurm", jobs=4,
                        slurm={"cluster": "local"})
    assert result.complete and result.ran == len(entries)
    rows = _check_summary(out, len(entries))
    assert {r["model_type"] for r in rows} >= set(ARCHS)
    again = run_census(entries, _settings(), out, launcher="slurm", slurm={"cluster": "local"})
    assert again.ran == 0 and again.skipped == len(entries)


class _FakeJob:
    def __init__(self, i: int, stop_at: int) -> None:
        self.job_id, self.i, self.stop_at, self.cancelled, self.finished = f"j{i}", i, stop_at, False, False

    def done(self) -> bool:
        return self.finished

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True

    def result(self) -> dict:
        if self.i == self.stop_at:
            raise KeyboardInterrupt  # the census is stopped while it waits on this job
        self.finished = True
        return {"model": self.job_id}


def test_slurm_jobs_are_cancelled_when_the_census_is_stopped(monkeypatch) -> None:  # noqa: ANN001
    """Ctrl-C or SIGTERM while waiting: every unfinished job is cancelled, none left to run on
    the cluster after the census is gone; finished ones are not touched."""
    from achilles.scale.census import launch

    made: list[_FakeJob] = []

    class Executor:
        def __init__(self, folder: str, cluster: str | None) -> None: ...

        def update_parameters(self, **kw: object) -> None: ...

        def map_array(self, fn: object, tasks: list, settings: list) -> list[_FakeJob]:
            jobs = [_FakeJob(len(made) + i, stop_at=1) for i in range(len(tasks))]
            made.extend(jobs)
            return jobs

    monkeypatch.setattr(launch, "_import_submitit", lambda: type("M", (), {"AutoExecutor": Executor}))
    with pytest.raises(KeyboardInterrupt):
        run_slurm(["t0", "t1", "t2"], None, folder="x", gpus=[0, 0, 1])  # type: ignore[arg-type]
    assert [(j.job_id, j.finished, j.cancelled) for j in made] == [
        ("j0", True, False), ("j1", False, True), ("j2", False, True)]
