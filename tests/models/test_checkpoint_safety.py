"""Every checkpoint reader runs no code from the file, reads genuine files with foreign metadata, and says
clearly what is wrong with a file it cannot read."""

from __future__ import annotations

import collections
import os
import pickle
import struct
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tocalib.models import StateDictMismatchError, create_model, load_official_state_dict
from tocalib.models.heads import load_mmengine_checkpoint, paca_segmentor
from tocalib.models.loading import ForeignObject, foreign_classes, read_checkpoint
from tocalib.models.viz_cli import main as viz_main
from tocalib.reproductions.train.checkpoint import CHECKPOINT_VERSION, load_checkpoint

TINY = "pacavit_tiny_p2cconv_100_0"
SMALL = {"embed_dims": (16, 16, 16, 16), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}
SYSTEM_CALL = f"{os.mkdir.__module__}.mkdir"  # posix.mkdir, as pickle names it


class Payload:
    """Pickles as a call of ``os.mkdir(marker)``: plain pickle creates the marker when it loads this."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_the_payload_is_live_under_plain_pickle(tmp_path: Path) -> None:
    pickle.loads(pickle.dumps(Payload(tmp_path / "made")))
    assert (tmp_path / "made").is_dir()


def _backbone() -> torch.nn.Module:
    return create_model(TINY, num_classes=10, **SMALL)


def _segmentor() -> torch.nn.Module:
    return paca_segmentor(create_model(TINY, features_only=True, **SMALL), [16] * 4, num_classes=3, channels=8)


LOADERS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[Path], object]]] = {
    "read_checkpoint": (_backbone, read_checkpoint),
    "load_official_state_dict": (_backbone, lambda path: load_official_state_dict(_backbone(), path)),
    "create_model(pretrained=)": (_backbone, lambda path: create_model(TINY, pretrained=path, num_classes=10, **SMALL)),
    "load_mmengine_checkpoint": (_segmentor, lambda path: load_mmengine_checkpoint(_segmentor(), path)),
}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_no_weights_loader_runs_code_from_the_file(tmp_path: Path, name: str) -> None:
    build, load = LOADERS[name]
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    state = {f"module.{k}": v for k, v in build().state_dict().items()}
    torch.save({"meta": {"epoch": 3, "hook": Payload(marker)}, "state_dict": state}, path)
    result = load(path)
    assert not marker.exists()
    if isinstance(result, torch.nn.Module):  # create_model: the weights arrived
        assert all(torch.equal(v, state[f"module.{k}"]) for k, v in result.state_dict().items())
    elif name == "read_checkpoint":
        assert isinstance(result["meta"]["hook"], ForeignObject) and result["meta"]["epoch"] == 3
        assert foreign_classes(result) == [SYSTEM_CALL]
    else:
        assert result.foreign == [SYSTEM_CALL] and not result.missing and not result.unexpected


def test_training_resume_runs_no_code_from_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "step": 1, "rng": {}, "version": CHECKPOINT_VERSION}
    torch.save({**state, "extra": Payload(marker)}, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert not marker.exists()
    assert isinstance(loaded["extra"], ForeignObject) and loaded["step"] == 1


def test_the_viz_cli_runs_no_code_from_its_checkpoint(tmp_path: Path) -> None:
    from PIL import Image

    marker, path, image = tmp_path / "pwned", tmp_path / "evil.pth", tmp_path / "image.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(image)
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": Payload(marker)}, path)
    with pytest.raises(StateDictMismatchError):  # read (safely), then refused: not the CLI's model
        viz_main([str(image), TINY, "--out", str(tmp_path / "grid.png"), "--checkpoint", str(path), "--size", "32"])
    assert not marker.exists()


@pytest.fixture
def mmengine_unavailable() -> Iterator[type]:
    """A class that pickles under mmengine's module path, which is not importable when the file is read."""
    names = ["mmengine", "mmengine.logging", "mmengine.logging.history_buffer"]
    assert not any(name in sys.modules for name in names)
    modules = {name: types.ModuleType(name) for name in names}

    class HistoryBuffer:
        def __init__(self) -> None:
            self._log_history, self.max_length = [0.5, 0.25], 1000

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = "mmengine.logging.history_buffer", "HistoryBuffer"
    modules["mmengine.logging.history_buffer"].HistoryBuffer = HistoryBuffer
    sys.modules.update(modules)
    try:
        yield HistoryBuffer
    finally:
        for name in names:
            sys.modules.pop(name, None)


def test_a_genuine_mmengine_file_loads_without_mmengine(tmp_path: Path, mmengine_unavailable: type) -> None:
    source = _segmentor()
    checkpoint = {
        "meta": {"mmseg_version": "1.2.2", "epoch": 80, "seed": np.int64(0), "hist": np.arange(3)},
        "state_dict": {k: v.clone() for k, v in source.state_dict().items()},
        "message_hub": {"log_scalars": {"train/loss": mmengine_unavailable()}, "runtime_info": {"iter": 160000}},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]},
    }
    torch.save(checkpoint, tmp_path / "iter_160000.pth")
    for name in list(sys.modules):
        if name.startswith("mmengine"):
            sys.modules.pop(name, None)
    target = _segmentor()
    report = load_mmengine_checkpoint(target, tmp_path / "iter_160000.pth")
    assert "mmengine.logging.history_buffer.HistoryBuffer" in report.foreign
    assert any(name.startswith("numpy") for name in report.foreign)
    assert sorted(report.loaded) == sorted(target.state_dict())
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    buffer = read_checkpoint(tmp_path / "iter_160000.pth")["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, ForeignObject) and buffer.state["_log_history"] == [0.5, 0.25]


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.ones(64, 64)}}, good)
    files = {
        "empty": (b"", "is empty"),
        "truncated": (good.read_bytes()[: good.stat().st_size // 2], "damaged or truncated zip archive"),
        "text": (b"this is a README, not weights\n" * 4, "starting with b'this is "),
        "image": (b"\x89PNG\r\n\x1a\n" + bytes(64), "starting with b'\\x89PNG"),
    }
    out = {}
    for name, (content, message) in files.items():
        (tmp_path / f"{name}.pth").write_bytes(content)
        out[name] = (tmp_path / f"{name}.pth", message)
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    out["list"] = (tmp_path / "list.pth", "holds a list, expected a dict")
    return out


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "image", "list"])
def test_unreadable_files_get_one_clear_message_that_never_advises_unsafe_loading(tmp_path: Path, kind: str) -> None:
    path, message = _bad_files(tmp_path)[kind]
    for load in (read_checkpoint, lambda p: load_official_state_dict(_backbone(), p), load_checkpoint):
        with pytest.raises(ValueError, match="checkpoint file") as info:
            load(path)
        assert str(path) in str(info.value) and message in str(info.value)
        assert "weights_only=False" not in str(info.value)


def test_a_missing_file_is_named() -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        read_checkpoint("nope.pth")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=200) | st.builds(lambda body: b"\x80\x02" + body + b".", st.binary(max_size=60)))
def test_arbitrary_bytes_are_refused_cleanly_or_read_inertly(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file.pth"
        path.write_bytes(content)
        try:
            result = read_checkpoint(path)
        except ValueError as err:  # never another type, never a raw internal error
            assert str(path) in str(err) and "weights_only=False" not in str(err)
        else:
            assert isinstance(result, dict)


def _text(value: str) -> bytes:  # a BINUNICODE opcode
    return b"X" + struct.pack("<I", len(value.encode())) + value.encode()


def _fake_pickle_module(payload: bytes) -> types.ModuleType:
    """A pickle module whose Pickler writes ``payload`` as the checkpoint's data.pkl (torch.save's zip)."""

    class Pickler:
        def __init__(self, file: object, protocol: object = None) -> None:
            self.file = file

        def dump(self, obj: object) -> None:
            self.file.write(payload)

    return types.SimpleNamespace(Pickler=Pickler, __name__="fake_pickle")


def test_a_pickle_cannot_change_classes_or_functions_of_the_process(tmp_path: Path) -> None:
    """BUILD on an allowed class or function would set its attributes for the whole process."""
    counter_update = _text("a") + b"ccollections\nCounter\n" + b"N}" + _text("update") + b"cevil\nThing\n" + b"s\x86b"
    defaults = _text("b") + b"ctorch._utils\n_rebuild_tensor_v2\n" + b"N}" + _text("__defaults__") + _text("x")
    defaults += b"\x85s\x86b"
    for part in (counter_update, defaults):
        path = tmp_path / "poison.pth"
        torch.save({}, path, pickle_module=_fake_pickle_module(b"\x80\x02}" + part + b"s."))
        with pytest.raises(ValueError, match="refusing to set the state of a "):
            read_checkpoint(path)
    assert collections.Counter("aab") == {"a": 2, "b": 1}
    assert torch._utils._rebuild_tensor_v2.__defaults__ != ("x",)


def test_the_restricted_reader_looks_up_no_codec_by_name(tmp_path: Path) -> None:
    """(torch's own weights-only reader imports ``encodings.<name>`` here; the foreign object sends the file
    to the restricted reader, which only encodes latin1, as pickled bytes need.)"""
    foreign = _text("e") + b"cevil\nThing\n)R"
    payload = b"\x80\x02}(" + foreign + _text("d") + b"c_codecs\nencode\n" + _text("x") + _text("idna") + b"\x86Ru."
    torch.save({}, tmp_path / "codec.pth", pickle_module=_fake_pickle_module(payload))
    with pytest.raises(ValueError, match="refusing the text encoding 'idna'"):
        read_checkpoint(tmp_path / "codec.pth")


def test_a_legacy_file_that_needs_more_than_tensors_is_refused_unread(tmp_path: Path) -> None:
    """torch's legacy loader acts on what it unpickles (here: it would write ``<name>.patch``), so a legacy
    file gets no second, restricted try."""
    target = tmp_path / "written"
    main = (
        b"\x80\x02}" + _text("k") + b"ctorch._utils\n_rebuild_tensor_v2\nq\x01"
        + b"}" + _text("dump_patches") + b"\x88s" + b"}" + _text("__name__") + _text(str(target)) + b"s\x86b0"
        + b"(" + _text("module") + b"h\x01" + _text("x.py") + _text("ATTACKER CONTENT") + b"tQs."
    )  # fmt: skip
    header = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
    with open(tmp_path / "legacy.pth", "wb") as file:
        for part in (0x1950A86A20F9469CFC6C, 1001, header):
            file.write(pickle.dumps(part, protocol=2))
        file.write(main + pickle.dumps([], protocol=2))
    with pytest.raises(ValueError, match=r"a legacy pre-1\.6 file is read only when it holds tensors"):
        read_checkpoint(tmp_path / "legacy.pth")
    assert not any(tmp_path.glob("written*"))
    torch.save({"w": torch.ones(2)}, tmp_path / "plain_legacy.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(tmp_path / "plain_legacy.pth")["w"], torch.ones(2))


class _Node:
    def __init__(self) -> None:
        self.me = self


def test_cycles_and_shared_parts_are_listed_once_and_quickly(tmp_path: Path, mmengine_unavailable: type) -> None:
    shared: list = [mmengine_unavailable()]
    for _ in range(40):  # 2**40 paths, 41 objects
        shared = [shared, shared]
    loop: list = []
    loop.append(loop)
    torch.save({"meta": {"dag": shared, "loop": loop, "node": _Node()}}, tmp_path / "cycles.pth")
    content = read_checkpoint(tmp_path / "cycles.pth")
    assert foreign_classes(content) == sorted([f"{__name__}._Node", "mmengine.logging.history_buffer.HistoryBuffer"])
    node = content["meta"]["node"]
    assert isinstance(node, ForeignObject) and node.state["me"] is node


def test_a_checkpoint_fine_tuned_onto_other_classes_loads_with_reset_head(tmp_path: Path) -> None:
    source = create_model(TINY, num_classes=10, **SMALL)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "ft.pth")
    with pytest.raises(StateDictMismatchError, match="pass reset_head=True"):
        load_official_state_dict(create_model(TINY, num_classes=3, **SMALL), tmp_path / "ft.pth")
    target = create_model(TINY, num_classes=3, **SMALL)
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("head.")}
    report = load_official_state_dict(target, tmp_path / "ft.pth", reset_head=True)
    assert report.reset == sorted(fresh) and report.ignored == sorted(fresh) and not report.missing
    for key, value in target.state_dict().items():
        expected = fresh[key] if key.startswith("head.") else source.state_dict()[key]
        assert torch.equal(value, expected), key


def test_the_viz_cli_takes_a_fine_tuned_checkpoint_and_names_bad_images(tmp_path: Path, capsys) -> None:
    from PIL import Image

    small = create_model(TINY, num_classes=7, **SMALL)
    torch.save({"state_dict": small.state_dict()}, tmp_path / "ft.pth")
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(StateDictMismatchError):  # a different architecture still refuses: only the head is free
        viz_main([str(image), TINY, "--out", str(tmp_path / "g.png"), "--checkpoint", str(tmp_path / "ft.pth")])
    full = create_model(TINY, num_classes=7)
    torch.save({"state_dict": full.state_dict()}, tmp_path / "ft_full.pth")
    args = ["--out", str(tmp_path / "g.png"), "--checkpoint", str(tmp_path / "ft_full.pth"), "--size", "32"]
    assert viz_main([str(image), TINY, *args]) == 0
    for bad, message in (("missing.png", "does not exist"), ("notes.png", "is not an image Pillow can read")):
        with pytest.raises(SystemExit, match=message):
            viz_main([str(tmp_path / bad), TINY, *args])
    with pytest.raises(SystemExit, match=r"checkpoint file .*nope\.pth' does not exist"):
        viz_main([str(image), TINY, "--out", str(tmp_path / "g.png"), "--checkpoint", str(tmp_path / "nope.pth")])
    with pytest.raises(SystemExit, match="is not a writable folder"):
        viz_main([str(image), TINY, "--out", str(tmp_path / "no" / "g.png")])


@settings(max_examples=40, deadline=None)
@given(
    size=st.text(alphabet="0123456789,-. x", max_size=8),
    clusters=st.integers(-3, 3),
    cell=st.integers(-3, 3),
)
def test_the_viz_cli_refuses_bad_options_with_one_line(size: str, clusters: int, cell: int) -> None:
    """Every malformed option ends the CLI with a message (argparse's exit 2 or a named SystemExit), before
    any model is built; valid ones get as far as the (missing) image."""
    argv = ["missing.png", TINY, "--out", "g.png", f"--size={size}", f"--max-clusters={clusters}"]
    with pytest.raises(SystemExit) as info:
        viz_main([*argv, f"--cell-size={cell}"])
    message = str(info.value.code)
    assert info.value.code == 2 or "must be >= 1" in message or "does not exist" in message
