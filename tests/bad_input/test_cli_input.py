"""Hostile or unlucky input at the `vlp` command: checkpoints that carry code, remote or cut
checkpoints, training that goes non-finite, folders that cannot be written, constructor
errors, recipes and checkpoints that do not fit. Each ends in one `error:` paragraph
(exit code 2), and nothing is executed, lost or saved silently."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch
from helpers import run_in

from vlp.data.synth import write_shapes
from vlp.errors import CheckpointError, NonFiniteError

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny" / "clip.yaml")


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root / "shapes", seed=0, size=400, samples_per_shard=100, image_size=32)
    return root / "shapes" / "manifests"


def tiny_args(manifests: Path, steps: int = 3, *extra: str) -> list[str]:
    """The tiny CLIP recipe at test size (1-layer towers of width 32, 32 px, batch 16)."""
    return [
        "--config",
        RECIPE,
        f"--data.init_args.train=[{{manifest: {manifests / 'shapes_pair.yaml'}, split: train}}]",
        f"--data.init_args.val=[{{manifest: {manifests / 'shapes_retrieval.yaml'}, split: val}}]",
        f"--data.init_args.test=[{{manifest: {manifests / 'shapes_retrieval.yaml'}, split: test}}]",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0",
        "--model.init_args.image_encoder.init_args.img_size=32",
        "--model.init_args.image_encoder.init_args.model_kwargs={patch_size: 16, embed_dim: 32, depth: 1, num_heads: 2}",
        "--model.init_args.text_encoder.init_args.config={model_type: bert, vocab_size: 30522, hidden_size: 32, "
        "num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}",
        "--model.init_args.embed_dim=32",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.default_root_dir=run",
        "--trainer.logger={class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: run, name: logs}}",
        *extra,
    ]


def checkpoint_callback(dirpath: str, every: int | None = None) -> str:
    every_arg = f", every_n_train_steps: {every}" if every else ""
    return (
        "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
        f"init_args: {{dirpath: {dirpath}, save_last: true, save_top_k: 0{every_arg}}}}}]"
    )


def fails_with(capsys, folder, args) -> str:
    """Run ``vlp ARGS`` in ``folder``; it must exit with 2 and one short error paragraph."""
    with pytest.raises(SystemExit) as e:
        run_in(folder, args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A 3-step fit: its folder and its last checkpoint."""
    folder = tmp_path_factory.mktemp("trained")
    run_in(folder, ["fit", *tiny_args(shapes, 3, checkpoint_callback("ckpts"))])
    return folder, folder / "ckpts" / "last.ckpt"


# -- checkpoints that carry code ----------------------------------------------------------------
@pytest.fixture
def http_server(tmp_path):
    """A web server on 127.0.0.1 serving ``tmp_path/www``; → its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_ckpt_path_is_refused_and_never_unpickled(shapes, tmp_path, http_server, capsys):
    """`--ckpt_path http://...` serving a pickle with code: refused; with --allow_remote_ckpt it
    is fetched but read with weights_only=True, so the code never runs."""
    www, url = http_server
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": _Payload(str(marker))}, www / "x.ckpt")
    err = fails_with(capsys, tmp_path / "a", ["fit", *tiny_args(shapes), "--ckpt_path", f"{url}/x.ckpt"])
    assert "is remote" in err and "--allow_remote_ckpt" in err
    args = ["fit", *tiny_args(shapes), "--ckpt_path", f"{url}/x.ckpt", "--allow_remote_ckpt"]
    err = fails_with(capsys, tmp_path / "b", args)
    assert "weights_only=True" in err and "x.ckpt" in err
    assert not marker.exists()


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_local_ckpt_path_with_code_is_refused(shapes, tmp_path, capsys, subcommand):
    """A local `--ckpt_path` whose pickle would run code: a CheckpointError, the code never runs."""
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": _Payload(str(marker))}, tmp_path / "evil.ckpt")
    err = fails_with(capsys, tmp_path, [subcommand, *tiny_args(shapes), "--ckpt_path", str(tmp_path / "evil.ckpt")])
    assert "evil.ckpt" in err and "weights_only=True" in err
    assert not marker.exists()


def test_weights_only_false_is_refused(shapes, trained, tmp_path, capsys):
    """`--weights_only false` would let Lightning unpickle code: refused."""
    _, ckpt = trained
    err = fails_with(capsys, tmp_path, ["fit", *tiny_args(shapes), "--ckpt_path", str(ckpt), "--weights_only", "false"])
    assert "--weights_only false is refused" in err


def test_resume_from_a_good_checkpoint_still_works(shapes, trained, tmp_path):
    """The checks let a complete vlp checkpoint through (read with weights_only=True)."""
    _, ckpt = trained
    cli = run_in(tmp_path, ["fit", *tiny_args(shapes, 4, checkpoint_callback("ckpts")), "--ckpt_path", str(ckpt)])
    assert cli.trainer.global_step == 4


# -- empty and cut checkpoints, from every entry point ------------------------------------------
@pytest.fixture
def broken(trained, tmp_path):
    """An empty file and the first 40% of a real checkpoint."""
    _, ckpt = trained
    (tmp_path / "empty.ckpt").write_bytes(b"")
    data = ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: int(0.4 * len(data))])
    return tmp_path / "empty.ckpt", tmp_path / "cut.ckpt"


def test_empty_and_cut_checkpoints_at_every_entry_point(shapes, broken, tmp_path, capsys):
    """0-byte and truncated checkpoints given to `vlp test --ckpt`, `--ckpt_path`, `init_from` and
    both converters: one sentence naming the file."""
    for path in broken:
        entry_points = [
            ["test", "--ckpt", str(path)],
            ["fit", *tiny_args(shapes), "--ckpt_path", str(path)],
            ["validate", *tiny_args(shapes), "--ckpt_path", str(path)],
            ["fit", *tiny_args(shapes), f"--model.init_args.init_from={path}"],
            ["convert", "albef", str(path), "--out", str(tmp_path / "out.ckpt")],
            ["convert", "meter", str(path), "--out", str(tmp_path / "out.ckpt")],
        ]
        for args in entry_points:
            err = fails_with(capsys, tmp_path / "work", args)
            assert path.name in err, (args, err)
            assert ("empty" in err) if path.name == "empty.ckpt" else ("truncated" in err), (args, err)


def test_ckpt_path_that_does_not_exist(shapes, tmp_path, capsys):
    """`--ckpt_path nope.ckpt`: one sentence naming it."""
    err = fails_with(capsys, tmp_path, ["fit", *tiny_args(shapes), "--ckpt_path", "nope.ckpt"])
    assert "ckpt_path not found" in err and "nope.ckpt" in err


# -- non-finite training ------------------------------------------------------------------------
def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def test_nonfinite_loss_stops_before_a_checkpoint_is_saved(shapes, tmp_path, capsys):
    """lr 1e6 (loss NaN from the second step): the run stops naming the step and the objective;
    every checkpoint written (one per step) holds finite tensors only."""
    args = [
        "fit",
        *tiny_args(shapes, 30, checkpoint_callback("ckpts", every=1)),
        "--model.init_args.optim.lr=1e6",
        "--model.init_args.optim.warmup_steps=0",
    ]
    err = fails_with(capsys, tmp_path, args)
    assert "training step" in err and "itc_loss" in err and "not finite" in err
    step = int(err.split("training step ")[1].split(":")[0])
    assert step < 30
    saved = list((tmp_path / "ckpts").glob("*.ckpt"))
    for path in saved:
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["global_step"] <= step
        assert all(torch.isfinite(t).all() for t in _tensors(ckpt["state_dict"]) if t.is_floating_point()), path


def test_nonfinite_steps_may_be_skipped_up_to_a_bound(shapes, tmp_path, capsys):
    """optim.max_nonfinite_steps: 2 skips two non-finite steps (counted, logged) and stops at the third."""
    args = [
        "fit",
        *tiny_args(shapes, 30),
        "--model.init_args.optim.lr=1e6",
        "--model.init_args.optim.warmup_steps=0",
        "--model.init_args.optim.max_nonfinite_steps=2",
    ]
    err = fails_with(capsys, tmp_path, args)
    assert "2 such step(s) skipped before" in err


def test_nonfinite_gradient_with_a_finite_loss_stops_before_the_update():
    """A gradient that is inf while the loss is finite: the optimiser step never sees it."""
    from vlp.models.base import OptimConfig, VLPModule

    module = VLPModule([])
    module.layer = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module.layer.weight.grad = torch.full((2, 2), float("inf"))
    with pytest.raises(NonFiniteError, match=r"gradients are not finite .*layer\.weight"):
        module.on_before_optimizer_step(opt)
    module.optim = OptimConfig(max_nonfinite_steps=1)
    module.nonfinite_steps = 0
    before = module.layer.weight.detach().clone()
    module.on_before_optimizer_step(opt)  # skipped: gradients dropped, so the step changes nothing
    opt.step()
    assert module.nonfinite_steps == 1 and torch.equal(module.layer.weight, before)


# -- folders and init_from ----------------------------------------------------------------------
def test_unwritable_checkpoint_folder_stops_before_step_one(shapes, tmp_path, capsys):
    """A checkpoint folder that cannot be created or written: an error naming it, no training."""
    (tmp_path / "a-file").write_text("not a folder")
    err = fails_with(capsys, tmp_path, ["fit", *tiny_args(shapes, 3, checkpoint_callback("a-file/ckpts"))])
    assert "checkpoint folder" in err and "a-file/ckpts" in err and "not writable" in err
    assert not (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").exists()


def test_permission_denied_checkpoint_folder(tmp_path, monkeypatch):
    """A folder where writing is denied (chmod 500 for a normal user): CheckpointError."""
    from vlp.models.base import check_writable

    def deny(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", deny)
    with pytest.raises(CheckpointError, match="not writable.*Permission denied"):
        check_writable(str(tmp_path / "ckpts"))
    if os.geteuid() != 0:  # root writes through chmod 500; a normal user is refused for real
        monkeypatch.undo()
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(CheckpointError, match="not writable"):
            check_writable(str(ro))


def test_init_from_a_checkpoint_sharing_no_keys(shapes, tmp_path, capsys):
    """`init_from` a file whose tensor names are all foreign: an error, not a random-init run."""
    torch.save({"encoder.layer.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    err = fails_with(
        capsys, tmp_path, ["fit", *tiny_args(shapes), f"--model.init_args.init_from={tmp_path / 'other.pt'}"]
    )
    assert "shares no tensor name with CLIP" in err and "other.pt" in err


# -- recipes and checkpoints that do not fit -----------------------------------------------------
def test_recipe_with_a_plain_weights_file(shapes, trained, tmp_path, capsys):
    """`vlp test --config R --ckpt X.safetensors` uses the recipe given; a file of another shape
    is one sentence listing the tensor."""
    from safetensors.torch import save_file

    _, ckpt = trained
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    cli = run_in(tmp_path, ["test", *tiny_args(shapes), "--ckpt", str(tmp_path / "w.safetensors")])
    assert torch.equal(cli.model.state_dict()["text_proj.weight"], state["text_proj.weight"])
    state["text_proj.weight"] = torch.zeros(5, 5)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "bad.safetensors")
    err = fails_with(capsys, tmp_path, ["test", *tiny_args(shapes), "--ckpt", str(tmp_path / "bad.safetensors")])
    assert "does not fit CLIP" in err and "text_proj.weight: checkpoint (5, 5), model (32, 32)" in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--model.init_args.optim.lr=-1", "optim.lr must be > 0"),
        ("--model.init_args.optim.schedule=cosin", "optim.schedule must be cosine, linear or constant"),
        ("--model.init_args.objectives=[{class_path: vlp.objectives.ITC, init_args: {temperature: -0.1}}]", "ITC"),
        ("--model.init_args.objectives=[{class_path: vlp.objectives.ITM}]", "needs a model with 'fusion'"),
    ],
)
def test_constructor_errors_are_one_paragraph(shapes, tmp_path, capsys, override, expected):
    """vlp's own error raised in a constructor that jsonargparse calls is printed alone."""
    err = fails_with(capsys, tmp_path, ["fit", *tiny_args(shapes), override])
    assert expected in err
