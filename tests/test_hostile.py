"""Hostile and broken inputs: no file runs code when it is loaded, and every command fails on a
bad checkpoint or pretrained file, an unwritable --out (read-only, under a file, on a full disk)
with one line naming the file, exit status 2, and no torn or temporary file left.

The hostile checkpoint's (and open_clip weights') pickle calls ``Path.touch(marker)`` when
unpickled unsafely; every command runs in a process of its own and the marker must never appear. To keep the suite fast
those processes are forked, all at once, from one that has imported clipalign already
(``FORKER``); two run ``python -m clipalign`` from scratch, as a user does.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipalign import checkpoint as ckpt
from clipalign.cli import main
from clipalign.formats.folders import EmbeddingsFolder, IndexFolder, RunFolder
from clipalign.resume import set_rng_state
from clipalign.train import Trainer, TrainConfig
from tests.retrieval_toy import make_index

CLI = [sys.executable, "-m", "clipalign"]
TQDM = re.compile(r"\d+%\||it/s\]|s/it\]|img/s\]|\[\d\d:\d\d")

# Runs each job of the JSON list on stdin as `clipalign ARGV` in a child forked from this warm
# process, with its own stdout/stderr files, for a read-only job run as root without the
# capabilities that override permission bits (so that a read-only folder is read-only), and
# for a full-disk job under a file-size limit of `fsize` bytes (SIGXFSZ ignored: a write past
# it fails with EFBIG, as on a full disk). Prints {name: exit status}.
FORKER = r"""
import ctypes, json, os, resource, signal, sys, threading, time, traceback
import clipalign.cli
for name in clipalign.cli.COMMANDS:
    __import__(f"clipalign.cli.{name}")
import clipalign.evaluate, clipalign.train, data_prep.eval_source, retrieval.build, retrieval.embed, retrieval.server
import matplotlib.font_manager  # its font cache built here, not by a full-disk child (a fresh machine has none)

def drop_dac_override():
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]
    libc, header, data = ctypes.CDLL(None, use_errno=True), Header(0x20080522, 0), (Data * 2)()
    libc.capget(ctypes.byref(header), data)
    data[0].effective &= ~0b110  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    data[0].permitted &= ~0b110
    assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()

def drain(fd, path):
    with open(path, "wb") as out:
        while chunk := os.read(fd, 1 << 16):
            out.write(chunk)
    os.close(fd)

jobs, children, drains = json.load(sys.stdin), {}, []
sys.stdout.flush(); sys.stderr.flush()
for job in jobs:
    pipes = [os.pipe(), os.pipe()]  # the child's stdout, stderr: a file-size limit does not apply to pipes
    pid = os.fork()
    if pid == 0:
        rc = 99
        try:
            for fd, (read, write) in zip((1, 2), pipes):
                os.dup2(write, fd)
                os.close(read), os.close(write)
            if job["read_only"] and os.geteuid() == 0:
                drop_dac_override()
            if job["fsize"]:  # a full disk: writes past fsize bytes fail with EFBIG
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
            rc = clipalign.cli.main(job["argv"])
        except SystemExit as exit:
            rc = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(rc)
    children[pid] = job["name"]
    for (read, write), path in zip(pipes, (job["stdout"], job["stderr"])):
        os.close(write)
        drains.append(threading.Thread(target=drain, args=(read, path)))
        drains[-1].start()
status, deadline = {}, time.monotonic() + float(sys.argv[1])
while children and time.monotonic() < deadline:
    pid, code = os.waitpid(-1, os.WNOHANG)
    if pid:
        status[children.pop(pid)] = os.waitstatus_to_exitcode(code)
    else:
        time.sleep(0.05)
for pid, name in children.items():  # still running: it hung (a server that never stopped)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    status[name] = "hung"
for thread in drains:
    thread.join()
print(json.dumps(status))
"""


class Touch:
    """Pickles as ``Path.touch(marker)``: unpickling it with ``weights_only=False`` creates the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@dataclass
class World:
    root: Path
    marker: Path
    shards: Path
    good: Path
    evil: Path
    index: Path
    evil_index: Path
    evil_embeddings: Path
    evil_run: Path
    images: Path
    query: Path
    captioned: Path
    trunc: Path
    plain_list: Path
    evil_weights: Path
    zip_garbage: Path
    binary: Path


def _error_lines(stderr: str) -> list[str]:
    """stderr without blank lines and progress bars."""
    return [line.strip() for line in re.split(r"[\r\n]", stderr) if line.strip() and not TQDM.search(line)]


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("CLIPALIGN_DEBUG", None)
    return env


@dataclass
class Result:
    returncode: int | str
    stderr: str


def _run(argv: list, prefix: list[str] = ()) -> Result:
    """``python -m clipalign ARGV`` from scratch."""
    done = subprocess.run([*prefix, *CLI, *map(str, argv)], capture_output=True, text=True, timeout=300, env=_env())
    return Result(done.returncode, done.stderr)


def _forked(jobs: dict[str, dict], folder: Path, timeout: float = 240) -> dict[str, Result]:
    """Each job (``argv``, optionally ``read_only`` or ``fsize``) in its own process forked by FORKER."""
    folder.mkdir()
    spec = [{"name": name, "argv": [str(a) for a in job["argv"]], "read_only": job.get("read_only", False),
             "fsize": job.get("fsize"), "stdout": str(folder / f"{name}.out"), "stderr": str(folder / f"{name}.err")}
            for name, job in jobs.items()]
    done = subprocess.run([sys.executable, "-c", FORKER, str(timeout)], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=timeout + 120, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: Result(status[name], (folder / f"{name}.err").read_text()) for name in jobs}


def _assert_one_line(result: Result, names: str | Path, rc: int = 2) -> str:
    lines = _error_lines(result.stderr)
    assert result.returncode == rc and len(lines) == 1, (result.returncode, result.stderr[-3000:])
    assert str(names) in lines[0] and "error" in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "MARKER"
    index = make_index(root / "retrieval", n=32)  # also writes shards, a checkpoint and embeddings
    good = root / "retrieval" / "checkpoint.pt"
    state = torch.load(good, weights_only=True)
    evil = root / "evil.pt"
    # the real weights beside the payload: a file that, unpickled unsafely, would also work
    torch.save({**state, "payload": Touch(marker)}, evil)
    evil_weights = root / "evil_open_clip.pt"  # what `--model ca-nano --pretrained` reads: an open_clip state dict
    weights = {k.removeprefix("clip."): v for k, v in state["model"].items() if k.startswith("clip.")}
    torch.save({**weights, "payload": Touch(marker)}, evil_weights)

    evil_index = root / "evil_index"
    shutil.copytree(index, evil_index)
    shutil.copyfile(evil, IndexFolder(evil_index).model)
    # a text search with the traced text tower never opens model.pt: without it, it loads the model
    IndexFolder(evil_index).text_query.unlink(missing_ok=True)
    evil_embeddings = root / "evil_embeddings"
    shutil.copytree(root / "retrieval" / "emb", evil_embeddings)
    shutil.copyfile(evil, EmbeddingsFolder(evil_embeddings).model)
    evil_run = root / "evil_run"
    RunFolder(evil_run).checkpoints.mkdir(parents=True)
    shutil.copyfile(evil, RunFolder(evil_run).checkpoint(1))

    images = root / "images"
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (images / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(images / name / "0.png")
    captioned = root / "captioned"  # an image folder with captions, for prep
    captioned.mkdir()
    shutil.copyfile(images / "red" / "0.png", captioned / "a.png")
    (captioned / "a.txt").write_text("a red square\n")
    trunc = root / "truncated.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    plain_list = root / "list.pt"
    torch.save([1, 2, 3], plain_list)
    zip_garbage = root / "zip_garbage.pt"  # a zip's magic bytes, then nothing torch's reader can seek in
    zip_garbage.write_bytes(b"PK\x03\x04" + bytes(5000))
    binary = root / "binary.pt"  # neither a zip nor a pickle
    binary.write_bytes(b"\x93NUMPY not a checkpoint\n" + bytes(100))
    return World(root, marker, root / "retrieval" / "shards", good, evil, index, evil_index, evil_embeddings,
                 evil_run, images, images / "red" / "0.png", captioned, trunc, plain_list, evil_weights,
                 zip_garbage, binary)


def _train_args(w: World, out: Path, steps: int = 1) -> list:
    return ["train", "--data", w.shards, "--out", out, "--model", "ca-nano", "--steps", steps, "--batch-size", 8,
            "--workers", 0, "--shuffle-buffer", 8, "--checkpoint-every", 1, "--no-progress", "--no-tensorboard",
            "--precision", "fp32"]


@pytest.fixture(scope="module")
def trained_run(world) -> Path:
    """A real two-step run: checkpoints at steps 1 and 2."""
    out = world.root / "trained"
    Trainer(TrainConfig(data=str(world.shards), out=str(out), model="ca-nano", steps=2, batch_size=8, workers=0,
                        shuffle_buffer=8, checkpoint_every=1, precision="fp32", tensorboard=False)).fit()
    return out


def _writers(w: World, out: Path, trained_run: Path) -> dict[str, list]:
    """Every command that writes, writing under the folder ``out``."""
    return {
        "export": ["export", w.good, "--out", out / "export"],
        "eval": ["eval", "--checkpoint", w.good, "--data", w.images, "--out", out / "results.json"],
        "train": _train_args(w, out / "run"),
        "embed": ["embed", "--checkpoint", w.good, "--data", w.shards, "--out", out / "emb", "--no-progress"],
        "index": ["index", "--embeddings", w.root / "retrieval" / "emb", "--out", out / "index"],
        "search_html": ["search", "--index", w.index, "--text", "a red square", "--html", out / "page.html"],
        "plot": ["plot", trained_run, "--out", out / "curves.png"],
        "synth": ["synth", "--out", out / "synth", "--n", 4, "--n-eval", 2, "--workers", 1],
        "prep": ["prep", w.captioned, "--out", out / "shards", "--workers", 1],
        "upgrade": ["checkpoint", "upgrade", w.good, "--out", out / "new.pt", "--trust"],
    }


WRITERS = ["export", "eval", "train", "embed", "index", "search_html", "plot", "synth", "prep", "upgrade"]
# synth is left out until data_prep/synth.py names the file a full disk stops (it writes its
# images with Path.write_bytes, and the error names none)
FULL_DISK_WRITERS = WRITERS
FSIZE = 512  # bytes a full-disk job may write to any one file: less than every writer's output


def _jobs(w: World, trained_run: Path) -> dict[str, tuple[dict, Path, int]]:
    """name -> (job for ``_forked``, the file its error must name, its exit status)."""
    ro = w.root / "read_only"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    fallback = w.root / "fallback"
    shutil.copytree(trained_run, fallback)
    last = RunFolder(fallback).checkpoint(2)
    last.write_bytes(last.read_bytes()[:1000])  # cut short, as by a crash mid-write
    hostile = {
        "eval": ["eval", "--checkpoint", w.evil, "--data", w.images],
        "eval_run_folder": ["eval", "--checkpoint", w.evil_run, "--data", w.images],
        "classify": ["classify", w.query, "--checkpoint", w.evil, "--classes", "red,blue"],
        "export": ["export", w.evil, "--out", w.root / "x_export"],
        "embed": ["embed", "--checkpoint", w.evil, "--data", w.shards, "--out", w.root / "x_emb", "--no-progress"],
        "index_checkpoint": ["index", "--checkpoint", w.evil, "--data", w.shards, "--out", w.root / "x_index",
                             "--no-progress"],
        "index_embeddings": ["index", "--embeddings", w.evil_embeddings, "--out", w.root / "x_index2"],
        "train_resume": [*_train_args(w, w.evil_run, steps=2), "--resume"],
        "search_image": ["search", "--index", w.evil_index, "--image", w.query],
        "search_text": ["search", "--index", w.evil_index, "--text", "a red square"],
        "serve": ["serve", "--index", w.evil_index, "--port", 0, "--quiet"],
        "caption": ["caption", w.query, "--checkpoint", w.evil],
    }
    pretrained = ["--model", "ca-nano", "--pretrained", w.evil_weights]
    hostile.update({
        "pretrained_eval": ["eval", *pretrained, "--data", w.images],
        "pretrained_classify": ["classify", w.query, *pretrained, "--classes", "red,blue"],
        "pretrained_embed": ["embed", *pretrained, "--data", w.shards, "--out", w.root / "x_emb3", "--no-progress"],
        "pretrained_index": ["index", *pretrained, "--data", w.shards, "--out", w.root / "x_index3", "--no-progress"],
        "pretrained_export": ["export", *pretrained, "--out", w.root / "x_export3"],
    })
    in_run, in_index = RunFolder(w.evil_run).checkpoint(1), IndexFolder(w.evil_index).model
    named = {"eval_run_folder": in_run, "train_resume": in_run, "search_image": in_index, "search_text": in_index,
             "serve": in_index, "index_embeddings": EmbeddingsFolder(w.evil_embeddings).model}
    named.update({k: w.evil_weights for k in hostile if k.startswith("pretrained_")})
    jobs = {f"hostile_{k}": ({"argv": argv}, named.get(k, w.evil), 2) for k, argv in hostile.items()}
    jobs.update({f"read_only_{k}": ({"argv": argv, "read_only": True}, ro, 2)
                 for k, argv in _writers(w, ro, trained_run).items()})
    # an --out folder that exists and is read-only: the folder is there, its files cannot be made
    jobs["read_only_existing_export"] = ({"argv": ["export", w.good, "--out", ro], "read_only": True},
                                         ro / "ca-nano.safetensors", 2)
    for k in FULL_DISK_WRITERS:  # each in a folder of its own, for the check that it left no temporary file
        jobs[f"full_disk_{k}"] = ({"argv": _writers(w, w.root / "full_disk" / k, trained_run)[k], "fsize": FSIZE},
                                  w.root / "full_disk" / k, 2)
    jobs["truncated_latest_resume"] = ({"argv": [*_train_args(w, fallback, steps=2), "--resume"]}, last, 0)
    return jobs


@pytest.fixture(scope="module")
def results(world, trained_run) -> dict[str, tuple[Result, Path, int]]:
    jobs = _jobs(world, trained_run)
    full = world.root / "full"
    with ThreadPoolExecutor(max_workers=3) as pool:
        # from scratch, as a user runs it: a hostile checkpoint, and a disk that fills up (writes past
        # 2 MiB fail with EFBIG, SIGXFSZ ignored) while the first checkpoint is written
        scratch_evil = pool.submit(_run, ["eval", "--checkpoint", world.evil, "--data", world.images])
        full_disk = ["bash", "-c", 'trap "" XFSZ; ulimit -f 2048; exec "$@"', "bash"]
        scratch_full = pool.submit(_run, _train_args(world, full), full_disk)
        forked = _forked({name: job for name, (job, _, _) in jobs.items()}, world.root / "forked")
        out = {name: (forked[name], named, rc) for name, (_, named, rc) in jobs.items()}
        out["scratch_hostile_eval"] = (scratch_evil.result(), world.evil, 2)
        out["full_disk_train"] = (scratch_full.result(), RunFolder(full).checkpoint(1), 2)
    return out


HOSTILE = ["scratch_hostile_eval", "eval", "eval_run_folder", "classify", "export", "embed", "index_checkpoint",
           "index_embeddings", "train_resume", "search_image", "search_text", "serve", "caption"]
PRETRAINED = ["eval", "classify", "embed", "index", "export"]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_checkpoint_never_runs_and_is_one_line(name, world, results):
    result, named, rc = results[name if name.startswith("scratch") else f"hostile_{name}"]
    if name == "index_embeddings":
        # retrieval.build loads the copy of model.pt it has just made in the index's temporary folder
        named = IndexFolder("").model.name
    line = _assert_one_line(result, named, rc)
    if not name.startswith(("search", "serve")):  # an index folder first checks model.pt against its info.json
        assert "not a clipalign checkpoint" in line and "pathlib" in line, line
    assert not world.marker.exists()


@pytest.mark.parametrize("name", PRETRAINED)
def test_hostile_pretrained_weights_never_run_and_are_one_line(name, world, results):
    result, named, rc = results[f"hostile_pretrained_{name}"]
    line = _assert_one_line(result, named, rc)
    assert "refused" in line and "pathlib" in line, line
    assert not world.marker.exists()


def test_the_payload_is_real(tmp_path):
    # what every command refuses: unpickled unsafely, this file creates its marker
    torch.save({"payload": Touch(tmp_path / "marker")}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", WRITERS)
def test_a_read_only_out_is_one_line(name, results):
    result, named, rc = results[f"read_only_{name}"]
    assert "Permission denied" in _assert_one_line(result, named, rc)


def test_a_read_only_existing_out_is_one_line(results):
    result, named, rc = results["read_only_existing_export"]
    assert "Permission denied" in _assert_one_line(result, named, rc)
    assert not list(named.parent.iterdir())  # no temporary file either


@pytest.mark.parametrize("name", FULL_DISK_WRITERS)
def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(name, results):
    result, out, rc = results[f"full_disk_{name}"]
    line = _assert_one_line(result, out, rc)  # naming a file it was writing
    assert line.endswith(": File too large"), line
    named = Path(line.split(": error: ", 1)[1].removesuffix(": File too large").split(" -> ")[-1])
    assert not named.exists(), named  # never torn: written whole under its name, or not at all
    left = [p.relative_to(out) for p in out.rglob("*") if ".tmp" in p.name]
    assert not left, left


def test_a_full_disk_while_checkpointing_is_one_line(world, results):
    result, named, rc = results["full_disk_train"]
    assert "File too large" in _assert_one_line(result, named, rc)
    assert not list(RunFolder(world.root / "full").checkpoints.iterdir())  # no torn file, no temporary file


def test_resume_passes_over_a_truncated_latest_checkpoint(results):
    result, truncated, _ = results["truncated_latest_resume"]
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in _error_lines(result.stderr) if "warning" in line]
    assert len(warnings) == 1 and str(truncated) in warnings[0] and "step_00000001.pt" in warnings[0]
    assert ckpt.load_checkpoint(truncated)["step"] == 2  # trained again from step 1, and saved whole


# -- in-process: broken files for every command that reads a checkpoint ---------------------------
def _checkpoint_commands(w: World, path: Path) -> dict[str, list]:
    return {
        "eval": ["eval", "--checkpoint", path, "--data", w.images],
        "classify": ["classify", w.query, "--checkpoint", path, "--classes", "red,blue"],
        "export": ["export", path, "--out", w.root / "never"],
        "embed": ["embed", "--checkpoint", path, "--data", w.shards, "--out", w.root / "never", "--no-progress"],
        "index": ["index", "--checkpoint", path, "--data", w.shards, "--out", w.root / "never", "--no-progress"],
        "search": ["search", "--index", w.index, "--text", "x", "--checkpoint", path],
        "pretrained": [*_train_args(w, w.root / "never"), "--pretrained", path],
    }


@pytest.mark.parametrize("command", ["eval", "classify", "export", "embed", "index", "search", "pretrained"])
@pytest.mark.parametrize("case", ["truncated", "plain_list", "hostile", "zip_garbage", "binary"])
def test_a_broken_checkpoint_is_one_line(command, case, world, capsys):
    path = {"truncated": world.trunc, "plain_list": world.plain_list, "hostile": world.evil,
            "zip_garbage": world.zip_garbage, "binary": world.binary}[case]
    assert main([str(a) for a in _checkpoint_commands(world, path)[command]]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(path) in lines[0], lines
    assert not (world.root / "never").exists() and not world.marker.exists()


def test_the_errors_say_what_is_wrong(world):
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt") as err:
        ckpt.load_checkpoint(world.trunc)
    assert err.value.kind == ckpt.CORRUPT and err.value.path == world.trunc
    with pytest.raises(ckpt.CheckpointError, match=r"not a clipalign checkpoint \(it holds a list\)"):
        ckpt.load_checkpoint(world.plain_list)
    with pytest.raises(ckpt.CheckpointError, match="would import builtins.getattr, pathlib.Path"):
        ckpt.load_checkpoint(world.evil)
    export = torch.load(world.good, weights_only=True)["model"]
    torch.save({k: v for k, v in export.items() if k.startswith("clip.")}, world.root / "state_dict.pt")
    with pytest.raises(ckpt.CheckpointError, match="plain state dict"):
        ckpt.load_checkpoint(world.root / "state_dict.pt")
    (world.root / "empty.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="empty file"):
        ckpt.load_checkpoint(world.root / "empty.pt")
    (world.root / "text.pt").write_text("not a checkpoint\n")
    with pytest.raises(ckpt.CheckpointError, match="not a file torch.save writes"):
        ckpt.load_checkpoint(world.root / "text.pt")
    assert not world.marker.exists()


def test_a_zip_torch_cannot_seek_in_is_corrupt_not_a_bare_os_error(world):
    with pytest.raises(OSError) as raw:  # what torch itself raises: an errno, no file named
        torch.load(world.zip_garbage, weights_only=True)
    assert raw.value.filename is None and not isinstance(raw.value, ckpt.CheckpointError)
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt") as err:
        ckpt.load_checkpoint(world.zip_garbage)
    assert err.value.kind == ckpt.CORRUPT and err.value.path == world.zip_garbage


def _pretrained_line(world, capsys, path, model: str = "ca-nano") -> str:
    argv = [*_train_args(world, world.root / "never"), "--pretrained", path]
    argv[argv.index("--model") + 1] = model
    assert main([str(a) for a in argv]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(path) in lines[0], lines
    assert not (world.root / "never").exists()
    return lines[0]


def test_pretrained_weights_of_another_architecture_are_one_line(world, capsys, tmp_path):
    weights = tmp_path / "ca-nano.pt"
    state = torch.load(world.good, weights_only=True)["model"]
    torch.save({k.removeprefix("clip."): v for k, v in state.items() if k.startswith("clip.")}, weights)
    line = _pretrained_line(world, capsys, weights, model="ca-tiny")  # open_clip asserts while resizing
    assert "do not fit the architecture of model ca-tiny" in line, line
    misshapen = tmp_path / "misshapen.pt"
    torch.save({**torch.load(weights, weights_only=True), "visual.conv1.weight": torch.zeros(64, 3, 4, 4)}, misshapen)
    line = _pretrained_line(world, capsys, misshapen)  # torch's load_state_dict names the weight
    assert "do not fit the architecture of model ca-nano" in line and "visual.conv1.weight" in line, line


def test_pretrained_that_is_no_pytorch_file_says_so(world, capsys):
    line = _pretrained_line(world, capsys, world.binary)
    assert "not a PyTorch checkpoint" in line and "other than tensors" not in line, line
    assert "refused" in _pretrained_line(world, capsys, world.evil_weights)  # a real pickle: refused


@pytest.mark.parametrize("command", WRITERS)
def test_an_out_under_a_regular_file_is_one_line(command, world, trained_run, capsys):
    blocker = world.root / "a_file"
    blocker.write_text("")
    assert main([str(a) for a in _writers(world, blocker, trained_run)[command]]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(blocker) in lines[0], lines
    assert "Not a directory" in lines[0] or "File exists" in lines[0], lines


# -- checkpoints of earlier versions -------------------------------------------------------------
@pytest.fixture(scope="module")
def legacy(trained_run) -> tuple[Path, dict]:
    """A real step-1 checkpoint as an earlier clipalign wrote it: NumPy's RNG state as its own tuple."""
    state = torch.load(ckpt.checkpoint_path(trained_run, 1), weights_only=True)
    n = state["rng"]["numpy"]
    old = (n["bit_generator"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    path = trained_run.parent / "legacy" / "step_00000001.pt"
    path.parent.mkdir()
    torch.save({**state, "rng": {**state["rng"], "numpy": old}}, path)
    return path, state


def test_a_real_trainer_checkpoint_loads_with_weights_only(trained_run):
    state = torch.load(ckpt.checkpoint_path(trained_run, 2), map_location="cpu", weights_only=True)
    assert state["step"] == 2 and {"optimizer", "scheduler", "rng", "data", "config"} <= state.keys()


def test_an_earlier_checkpoint_is_refused_with_the_way_out(legacy, capsys):
    path, _ = legacy
    with pytest.raises(ckpt.CheckpointError, match="earlier clipalign") as err:
        ckpt.load_checkpoint(path)
    assert err.value.kind == ckpt.LEGACY and f"clipalign checkpoint upgrade {path} --trust" in str(err.value)
    assert main(["checkpoint", "upgrade", str(path)]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "--trust" in line and "runs any code" in line


def test_upgrade_rewrites_it_safely_and_it_resumes_exactly(legacy, world, tmp_path, capsys):
    path, state = legacy
    new = tmp_path / "new.pt"
    assert main(["checkpoint", "upgrade", str(path), "--out", str(new), "--trust"]) == 0
    upgraded = ckpt.load_checkpoint(new)
    assert upgraded["rng"]["numpy"] == state["rng"]["numpy"]
    assert all(torch.equal(upgraded["model"][k], v) for k, v in state["model"].items())
    set_rng_state(upgraded["rng"])
    key, pos = np.random.get_state()[1:3]
    assert key.tolist() == state["rng"]["numpy"]["key"] and pos == state["rng"]["numpy"]["pos"]
    trainer = Trainer(TrainConfig(data=str(world.shards), out=str(tmp_path / "run"), model="ca-nano", steps=2,
                                  batch_size=8, workers=0, shuffle_buffer=8, precision="fp32", tensorboard=False))
    trainer.load_state_dict(upgraded)
    assert trainer.step == 1 and torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    in_place = shutil.copyfile(path, tmp_path / "in_place.pt")  # the default
    assert main(["checkpoint", "upgrade", str(in_place), "--trust"]) == 0
    assert ckpt.load_checkpoint(in_place)["rng"]["numpy"] == state["rng"]["numpy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_place.pt", "new.pt"]  # no temporary file left


def test_load_latest_passes_over_truncated_checkpoints(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = ckpt.checkpoint_path(run, 2)
    last.write_bytes(last.read_bytes()[:500])
    with pytest.warns(UserWarning, match="step_00000002.pt is truncated or corrupt: resuming from the earlier"):
        path, state = ckpt.load_latest(run)
    assert path == ckpt.checkpoint_path(run, 1) and state["step"] == 1
    first = ckpt.checkpoint_path(run, 1)
    first.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="no earlier checkpoint of the run loads"):
        ckpt.load_latest(run)


def test_load_latest_passes_over_a_latest_checkpoint_torch_cannot_seek_in(trained_run, world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copyfile(world.zip_garbage, ckpt.checkpoint_path(run, 2))
    with pytest.warns(UserWarning, match="step_00000002.pt is truncated or corrupt: resuming from the earlier"):
        path, state = ckpt.load_latest(run)
    assert path == ckpt.checkpoint_path(run, 1) and state["step"] == 1

