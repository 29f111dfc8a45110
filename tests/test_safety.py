"""Issue 21: never touch what the user did not hand over.

The mechanisms, each tested against what it promises (the one-line refusals are cases of the
bad-input matrix in ``test_bad_input.py``):

* the deletion guard (``achilles.results.guard``): only marked folders are deleted; an interrupted
  deletion or export is finished by the next run; ``--force`` swaps, then deletes;
* census names and run folders: names unique across explicit and automatic ones, a finished
  run matched by the model it was made from;
* remote-code precedence: a list line narrows, never widens, the command line;
* the census lock and shutdown: one census per folder, SIGTERM stops it now and leaves every
  run finished or cleanly unfinished, workers die with their parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tiny import TEXT

from achilles.cli import main
from achilles.config import IdentifyConfig, ModelSpec, RankConfig
from achilles.errors import AchillesError
from achilles.results import guard
from achilles.results.lock import claim_dir
from achilles.scale.census import run_census
from achilles.scale.census.models import read_model_list
from achilles.scale.census.run import DONE_FILE, CensusSettings, Task, collect, run_dir_of, run_task

REPO = Path(__file__).resolve().parents[1]
SINK, NATURAL = REPO / "models" / "sink", REPO / "models" / "natural"
FAST = ["--samples", "2", "--keep", "50", "--max-neurons", "10", "--no-report", "--no-explain", "--quiet"]


def _settings() -> CensusSettings:
    return CensusSettings(TEXT, RankConfig(samples=2, keep=50), IdentifyConfig(max_neurons=10),
                          report=False, explain=False)


def _list(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the deletion guard ------------------------------------------------------------------


def test_remove_made_deletes_only_marked_folders(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(guard.make_dir(tmp_path / "made", "census"))
    forged = tmp_path / "forged"  # a marker that is not achilles' (no id): not proof
    forged.mkdir()
    (forged / guard.MARKER).write_text(json.dumps({"kind": "achilles-made"}))
    for path, why in [(mine, "was not made"), (link, "symbolic link"), (mine / "precious.txt", "not a folder"),
                      (forged, "was not made"), (tmp_path / "made", "was not made by `achilles export`")]:
        with pytest.raises(AchillesError, match=why):
            guard.remove_made(path, "export" if path.name == "made" else None)
    assert (mine / "precious.txt").read_text() == "x" and (tmp_path / "made").is_dir()
    guard.remove_made(tmp_path / "made", "census")
    assert not (tmp_path / "made").exists() and link.is_symlink()


def test_interrupted_removal_keeps_its_marker_and_is_finished_later(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with guard.temp_dir(tmp_path, ".x.achilles-export-", "export") as d:
        for i in range(5):
            (d / f"f{i}").mkdir()
            (d / f"f{i}" / "w").write_text("w")
    calls = []

    def rmtree_then_killed(path: object) -> None:
        calls.append(path)
        raise KeyboardInterrupt  # what SIGTERM is in the CLI

    monkeypatch.setattr(guard.shutil, "rmtree", rmtree_then_killed)
    with pytest.raises(KeyboardInterrupt):
        guard.remove_made(d, "export")
    monkeypatch.undo()
    assert calls and guard.made_by(d, "export")  # the marker goes last
    held = guard.make_dir(tmp_path / "held-src", "export")
    held = held.rename(tmp_path / ".x.achilles-export-held")
    unmarked = tmp_path / ".x.achilles-export-user"
    unmarked.mkdir()
    (unmarked / "a").write_text("a")
    with guard.hold(held):  # a run still writing: not stale
        removed = guard.clean_stale(tmp_path, ".x.achilles-export-", "export")
    assert removed == [d] and held.is_dir() and (unmarked / "a").is_file()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_dir_swaps_then_deletes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(guard, "_exchange", lambda a, b: False)
    dest = guard.make_dir(tmp_path / "out", "export")
    (dest / "old.txt").write_text("old")
    with guard.temp_dir(tmp_path, ".out.achilles-export-", "export") as new:
        (new / "new.txt").write_text("new")
        monkeypatch.setattr(guard, "remove_made", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):  # killed while deleting the old folder
            guard.replace_dir(new, dest, "export")
    monkeypatch.undo()
    assert _files(dest) == {guard.MARKER: (dest / guard.MARKER).read_bytes(), "new.txt": b"new"}
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(left) == 1 and (left[0] / "old.txt").is_file()  # the old one, aside, marked
    assert guard.clean_stale(tmp_path, ".out.achilles-export-", "export") == left
    user = tmp_path / "user"
    user.mkdir()
    (user / "a").write_text("a")
    with (guard.temp_dir(tmp_path, ".user.achilles-export-", "export") as new2,
          pytest.raises(AchillesError, match="replaces only folders it made")):
        guard.replace_dir(new2, user, "export")
    assert _files(user) == {"a": b"a"}


def test_killed_export_leaves_a_folder_the_next_export_removes(tmp_path: Path, tiny_dir: Path) -> None:
    """SIGKILL mid-export (the issue: a 299 MB hidden folder no rerun removed)."""
    run = tmp_path / "run"
    assert main(["find", "--model", str(tiny_dir), "--text", TEXT, *FAST, "--epsilon", "1e-5",
                 "--max-neurons", "30", "--out-dir", str(run)]) == 0
    out = tmp_path / "exp"
    args = ["export", "--model", str(tiny_dir), "--mask", str(run / "ranking.json"), "--top", "2",
            "--out", str(out), "--quiet"]
    script = textwrap.dedent(f"""
        import sys, time
        import achilles.weights.export as ex
        real = ex.save_file
        def slow(*a, **k):
            real(*a, **k)
            print("written", flush=True)
            time.sleep(60)
        ex.save_file = slow
        from achilles.cli import main
        sys.exit(main({args!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    finally:
        proc.kill()
        proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".exp.")]
    assert len(left) == 1 and guard.made_by(left[0], "export") and not out.exists()
    assert main(args) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exp.")]
    assert guard.made_by(out, "export") and (out / "model.safetensors").is_file()
    assert main([*args, "--force"]) == 0  # replacing an export leaves nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "run"]


# --- census names, run folders and remote code --------------------------------------------


def test_names_unique_across_explicit_and_automatic(tmp_path: Path) -> None:
    entries = read_model_list(str(_list(tmp_path / "m.txt", str(SINK), f"{NATURAL} --name sink-2", str(SINK),
                                        ".hidden", "org/x --name sink-3")))
    assert [e.name for e in entries] == ["sink", "sink-2", "sink-4", "hidden", "sink-3"]


def test_a_list_line_narrows_never_widens_remote_code(tmp_path: Path) -> None:
    lines = _list(tmp_path / "m.txt", "org/a --trust-remote-code", "org/b --no-trust-remote-code", "org/c")
    allowed = read_model_list(str(lines), ModelSpec(model="-", trust_remote_code=True))
    assert [e.spec.trust_remote_code for e in allowed] == [True, False, True]
    with pytest.raises(AchillesError, match="m.txt:1: --trust-remote-code on a list line needs"):
        read_model_list(str(lines), ModelSpec(model="-", trust_remote_code=False))
    with pytest.raises(AchillesError, match="needs --trust-remote-code"):
        read_model_list(str(lines))  # a library call without a command line permits nothing
    assert not any(e.spec.trust_remote_code for e in read_model_list(str(lines), sizing_only=True))


def test_finished_run_is_matched_by_its_model_not_its_name(tmp_path: Path) -> None:
    """The issue's case: a finished run of natural in ``runs/sink-2`` is never sink's."""
    (natural,) = read_model_list(str(_list(tmp_path / "a.txt", f"{NATURAL} --name sink-2")))
    out = tmp_path / "census"
    row = run_task(Task(natural, str(run_dir_of(out, natural))), _settings())
    assert row["status"] == "ok" and (out / "runs" / "sink-2" / DONE_FILE).is_file()
    (sink,) = read_model_list(str(_list(tmp_path / "b.txt", f"{SINK} --name sink-2")))
    before = _files(out)
    with pytest.raises(AchillesError, match="holds a run of another model"):
        run_census([sink], _settings(), out)
    assert collect(out, [sink])[0]["status"] == "failed"  # never natural's row as sink's
    assert run_task(Task(sink, str(run_dir_of(out, sink))), _settings())["status"] == "failed"
    assert _files(out) == before


def test_unfinished_run_of_the_census_is_redone_but_a_users_folder_is_not_deleted(tmp_path: Path) -> None:
    (sink,) = read_model_list(str(_list(tmp_path / "a.txt", f"{SINK} --name s")))
    out = tmp_path / "census"
    run_dir = run_dir_of(out, sink)
    run_dir.mkdir(parents=True)
    (run_dir / "thesis.tex").write_text("years of work")
    row = run_task(Task(sink, str(run_dir)), _settings())  # what a census that changed under it sees
    assert row["status"] == "failed" and "was not made by this census" in row["error"]
    assert (run_dir / "thesis.tex").read_text() == "years of work"


def test_second_census_into_a_held_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "census"
    models = _list(tmp_path / "m.txt", str(SINK))
    with claim_dir(out):  # another census (or find) is writing there
        code = main(["census", "--models", str(models), "--text", TEXT, "--out-dir", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another achilles run is writing" in err[0]
    assert not out.exists()


# --- census shutdown -------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_census(tmp_path: Path) -> tuple[subprocess.Popen, Path, list[str]]:
    models = _list(tmp_path / "m.txt", f"{SINK} --name a", f"{NATURAL} --name b", f"{SINK} --name c",
                   f"{NATURAL} --name d")
    out = tmp_path / "census"
    argv = ["census", "--models", str(models), "--text", TEXT, "--out-dir", str(out), *FAST, "--jobs", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "achilles", *argv], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "runs" / "a").is_dir():
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc, out, argv


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_the_census_now_and_leaves_runs_finished_or_cleanly_unfinished(tmp_path: Path) -> None:
    proc, out, argv = _start_census(tmp_path)
    workers = _children(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 143 and time.monotonic() - t0 < 30
    assert "terminated" in (proc.stderr.read() if proc.stderr else "")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "a worker outlived the census"
    runs = sorted(p.name for p in (out / "runs").iterdir() if not p.name.startswith("."))
    assert "d" not in runs, "a queued model ran after SIGTERM"
    for name in runs:  # finished, or unfinished and marked (the next census redoes it)
        assert (out / "runs" / name / DONE_FILE).is_file() or guard.made_by(out / "runs" / name, "census")
    assert not (out / ".achilles.lock").exists()
    entries = {e.name: e for e in read_model_list(argv[2], ModelSpec(model="-"))}
    for name in runs:  # an unfinished one is removed through the guard and redone
        if not (out / "runs" / name / DONE_FILE).is_file():
            assert run_task(Task(entries[name], str(out / "runs" / name)), _settings())["status"] == "ok"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_census(tmp_path: Path) -> None:
    proc, out, _ = _start_census(tmp_path)
    try:
        deadline = time.monotonic() + 30
        workers: list[int] = []
        while time.monotonic() < deadline and not workers:
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert workers
        proc.kill()  # the parent only, not its process group
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "a worker outlived its killed census"
        assert not (out / "runs" / "d").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_only_the_deletion_guard_removes_folder_trees() -> None:
    """No module deletes a folder tree itself: ``rmtree`` lives in ``guard.py`` alone (so a
    new command cannot delete a folder because a path pointed there)."""
    import re

    pattern = re.compile(r"\brmtree\b|\bremovedirs\b|os\.rmdir\(|\.rmdir\(")
    allowed = {"guard.py", "files.py"}  # files.py: rmdir of the empty folders a failed write created
    found = []
    for path in sorted((REPO / "src" / "achilles").rglob("*.py")):
        if path.name in allowed:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not found, "delete through achilles.results.guard.remove_made:\n" + "\n".join(found)


def test_a_finished_run_from_before_the_markers_is_reused_never_deleted(tmp_path: Path) -> None:
    (sink,) = read_model_list(str(_list(tmp_path / "a.txt", f"{SINK} --name s")))
    run_dir = run_dir_of(tmp_path / "census", sink)
    assert run_task(Task(sink, str(run_dir)), _settings())["status"] == "ok"
    (run_dir / guard.MARKER).unlink()  # as a census of an earlier achilles left it
    before = _files(run_dir)
    assert run_task(Task(sink, str(run_dir)), _settings())["status"] == "ok"
    assert collect(tmp_path / "census", [sink])[0]["status"] == "ok"
    (natural,) = read_model_list(str(_list(tmp_path / "b.txt", f"{NATURAL} --name s")))
    assert run_task(Task(natural, str(run_dir)), _settings())["status"] == "failed"
    assert _files(run_dir) == before


def test_a_copied_marker_is_not_a_folder_achilles_made(tmp_path: Path) -> None:
    """A marked folder copied elsewhere (marker and all) is not made there: never deleted."""
    made = guard.make_dir(tmp_path / "made", "export")
    copy = tmp_path / "copy"
    shutil.copytree(made, copy)
    (copy / "precious.txt").write_text("mine")
    assert guard.made_by(made, "export") and not guard.made_by(copy, "export")
    with pytest.raises(AchillesError, match="was not made by"):
        guard.remove_made(copy, "export")
    with pytest.raises(AchillesError, match="was not made by"):
        guard.replace_dir(guard.make_dir(tmp_path / "new", "export"), copy, "export")
    assert (copy / "precious.txt").read_text() == "mine"
    # a folder achilles moved into place itself is still its own
    guard.replace_dir(guard.make_dir(tmp_path / "new2", "export"), made, "export")
    assert guard.made_by(made, "export")
