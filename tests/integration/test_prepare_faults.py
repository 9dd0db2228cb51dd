"""`brainenc prepare` under faults: ctrl-C and a truncated source file end in one line, and the
store left behind is never taken for a complete one (its manifest is written last)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from brainenc.data.store import Store, StoreError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def nsd_source(tmp_path_factory):
    from tests.fixtures.nsd import write_nsd

    return write_nsd(tmp_path_factory.mktemp("nsd_src"), fmt="nifti", shape=(16, 16, 12)).root


def _prepare(source: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "brainenc.cli", "prepare", "nsd", "--source", str(source), "--out", str(out),
            "--image-size", "12", "--checksum", "none", "-o", "sessions=2", "-o", "zscore=false", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def test_ctrl_c_during_prepare_exits_130_and_leaves_no_trusted_store(nsd_source, tmp_path):
    out = tmp_path / "store"
    proc = subprocess.Popen(_prepare(nsd_source, out), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # interrupt while the first subject is being written
        if line.startswith("[nsd] subj01"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("brainenc: interrupted (ctrl-C)")
    with pytest.raises(StoreError, match="manifest.yaml"):
        Store(out)
    # the rerun completes the store
    r = subprocess.run(_prepare(nsd_source, out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Store(out).subjects == ["subj01", "subj02"]


# the betas are read while the subject is written (the manifest is already gone: the store is not
# trusted); ncsnr is read while planning, before anything is touched (the old store stays valid)
@pytest.mark.parametrize("name, field, store_kept", [
    ("betas_session02.nii.gz", "<data>': expected a complete NIfTI file", False),
    ("ncsnr.nii.gz", "<data>': expected a complete NIfTI file", True)])
def test_truncated_source_file_during_a_reprepare_is_named(nsd_source, tmp_path, capsys, name, field, store_kept):
    import shutil

    from tests.helpers import console  # in-process: the same one-line handling as the command

    src = Path(shutil.copytree(nsd_source, tmp_path / "src"))
    out = tmp_path / "store"
    assert console(capsys, *_prepare(src, out)[3:])[0] == 0
    f = src / "nsddata_betas/ppdata/subj02/func1pt8mm/betas_fithrf_GLMdenoise_RR" / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rc, last = console(capsys, *_prepare(src, out, "--restart")[3:])
    assert rc == 2, last
    assert f"{f}: field '{field}" in last and "truncated or damaged?" in last
    if store_kept:
        assert Store(out).subjects == ["subj01", "subj02"]
    else:
        with pytest.raises(StoreError, match="manifest.yaml"):  # the half-rewritten store is not trusted
            Store(out)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.geteuid() == 0), reason="mounts a tmpfs (Linux, root)")
def test_simulate_onto_a_full_disk_is_one_line_not_a_segfault(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        r = subprocess.run([sys.executable, "-m", "brainenc.cli", "simulate", "--preset", "tiny", "--out",
                            str(disk / "sim")], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
        assert r.stderr.strip().splitlines()[-1].startswith(
            f"brainenc: error: {disk}/sim/simbrain7t: field '<disk>': expected about 2.")
        assert not (disk / "sim" / "simbrain7t" / "manifest.yaml").exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)])
