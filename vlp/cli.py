"""The ``vlp`` command.

    vlp fit      --config recipes/tiny/clip.yaml [--config more.yaml] [--key value ...]
    vlp validate|test|predict --config RECIPE.yaml   (or --ckpt PATH: recipe restored from it)
    vlp data synth|inspect|convert ...
    vlp convert albef CKPT --out PATH [--config RECIPE]   (official checkpoints -> vlp weights)
    vlp compare RUN_DIR|RESULTS.json ...   (test results of several runs side by side)

``fit``/``validate``/``test``/``predict`` are LightningCLI subcommands (model and data in
subclass mode, so recipes name ``class_path``/``init_args``). Every checkpoint written
by ``vlp fit`` carries its full recipe, so ``vlp test --ckpt PATH`` needs nothing else;
the weights are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence

from vlp.errors import CheckpointError, VLPError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
CONFIG_KEY = "vlp_config"
#: opt-in for a ``ckpt_path`` on a remote filesystem (still read with ``weights_only=True``)
ALLOW_REMOTE_FLAG = "--allow_remote_ckpt"


def _build_cli_class():
    """Imported lazily so that ``vlp data ...`` starts without Lightning."""
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from vlp.models.base import VLPModule
    from vlp.utils.checkpoint import check_ckpt_path, load_state_dict, shape_mismatches, split_unused_heads

    class ConfigToCheckpoint(SaveConfigCallback):
        """Saves config.yaml to the log dir and the same YAML text into every checkpoint."""

        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            checkpoint[CONFIG_KEY] = self.parser.dump(self.config, skip_none=False)

    class VLPCLI(LightningCLI):
        def __init__(self, args: list[str], weights: str | None = None, allow_remote: bool = False) -> None:
            self.weights = weights
            self.allow_remote = allow_remote
            super().__init__(
                VLPModule,
                pl.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=ConfigToCheckpoint,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                parser_kwargs={"default_env": False},
                args=args,
            )

        def _load_weights(self) -> None:
            if not self.weights:
                return
            # a recipe given with --config may list other objectives: heads load by name
            if self.datamodule is not None:  # the model meets the data first (embeddings grown for special tokens)
                self.model.check_data(self.datamodule)
            state = load_state_dict(self.weights)  # heads are keyed by objective name
            wrong = shape_mismatches(state, self.model)
            if wrong:
                raise CheckpointError(
                    f"checkpoint {self.weights} does not fit {type(self.model).__name__}: {len(wrong)} tensors "
                    f"have other shapes ({'; '.join(wrong[:5])}{'; ...' if len(wrong) > 5 else ''})"
                )
            result = self.model.load_state_dict(state, strict=False)
            unused, unexpected = split_unused_heads(result.unexpected_keys, list(self.model.objectives))
            if result.missing_keys or unexpected:
                raise CheckpointError(
                    f"checkpoint {self.weights} does not fit {type(self.model).__name__}: "
                    f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:5]}), "
                    f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})"
                )
            if unused:
                print(f"{self.weights}: heads of objectives {unused} are not in this recipe (not used)", flush=True)

        before_validate = before_test = before_predict = _load_weights

        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
            """Every checkpoint Lightning itself loads (``--ckpt_path``) is read as plain data
            (``weights_only=True``)."""
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            if kwargs.get("weights_only") is False:
                raise CheckpointError(
                    "--weights_only false is refused: vlp reads checkpoints as plain data only "
                    "(weights_only=True), never as pickled code"
                )
            if "weights_only" in self._subcommand_method_arguments[subcommand]:
                kwargs["weights_only"] = True
            return kwargs

        def _parse_ckpt_path(self) -> None:
            """``--ckpt_path`` is checked (remote refused without ``--allow_remote_ckpt``, a
            missing, empty or truncated file named) before Lightning reads it."""
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path and subcommand == "fit":  # an unreadable last.ckpt falls back to the one before
                from vlp.utils.checkpoint import resolve_resume_checkpoint

                ckpt_path = resolve_resume_checkpoint(ckpt_path, self.config[subcommand].trainer.get("callbacks"))
            if ckpt_path:
                self.config[subcommand].ckpt_path = check_ckpt_path(ckpt_path, allow_remote=self.allow_remote)
            with _unreadable_as_checkpoint_error(ckpt_path):
                super()._parse_ckpt_path()

        def _run_subcommand(self, subcommand: str) -> None:
            with _unreadable_as_checkpoint_error(self.config[subcommand].get("ckpt_path")):
                super()._run_subcommand(subcommand)

    return VLPCLI


@contextlib.contextmanager
def _unreadable_as_checkpoint_error(ckpt_path):
    """A ``ckpt_path`` that ``torch.load(weights_only=True)`` refuses (pickled code, not a
    checkpoint) ends the run with a :class:`CheckpointError` naming it."""
    import pickle

    try:
        yield
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        if not ckpt_path or not ("weights_only" in str(e) or isinstance(e, pickle.UnpicklingError | EOFError)):
            raise
        reason = (str(e).strip().splitlines() or ["no message"])[0]
        raise CheckpointError(
            f"cannot read ckpt_path {ckpt_path} with weights_only=True ({type(e).__name__}: {reason}); "
            "it is not a vlp/Lightning checkpoint, is corrupt, or needs arbitrary code to unpickle"
        ) from None


def _pop_ckpt(args: list[str]) -> tuple[list[str], str | None]:
    """Remove ``--ckpt PATH`` / ``--ckpt=PATH`` from ``args``."""
    out, ckpt, i = [], None, 0
    while i < len(args):
        if args[i] == "--ckpt":
            if i + 1 >= len(args):
                raise VLPError("--ckpt needs a path")
            ckpt, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--ckpt="):
            ckpt = args[i].split("=", 1)[1]
        else:
            out.append(args[i])
        i += 1
    return out, ckpt


def _config_from_checkpoint(path: str, has_config: bool = False) -> str | None:
    """The recipe YAML stored in a checkpoint by ``vlp fit``, ready for another subcommand;
    None when it carries none but a recipe was given with ``--config`` (``has_config``)."""
    import yaml

    from vlp.utils.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    text = ckpt.get(CONFIG_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(text, str) or not text:
        if has_config:  # a plain state dict / safetensors file: the recipe comes from --config
            return None
        raise CheckpointError(
            f"{path} carries no vlp recipe (it was not written by `vlp fit`); pass the recipe with --config"
        )
    config = yaml.safe_load(text)
    for key in ("ckpt_path", "optimizer", "lr_scheduler"):  # fit-only keys
        config.pop(key, None)
    return yaml.safe_dump(config, sort_keys=False)


def lightning_main(args: list[str]) -> object:
    # vlp always hands LightningCLI its arguments explicitly (after taking --ckpt out)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    import torch

    # TF32 matmuls for 32-bit runs on GPUs (what Lightning's tensor-core warning asks for);
    # set VLP_FLOAT32_MATMUL_PRECISION=highest for bit-exact fp32.
    torch.set_float32_matmul_precision(os.environ.get("VLP_FLOAT32_MATMUL_PRECISION", "high"))
    # raised inside Lightning's own batch handling with torch >= 2.10; nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    args, ckpt = _pop_ckpt(args)
    allow_remote = ALLOW_REMOTE_FLAG in args
    args = [a for a in args if a != ALLOW_REMOTE_FLAG]
    subcommand = args[0] if args else None
    tmp = None
    try:
        if ckpt:
            if subcommand not in ("validate", "test", "predict"):
                raise VLPError("--ckpt goes with validate, test or predict (use --ckpt_path to resume a fit)")
            has_config = any(a == "--config" or a.startswith("--config=") for a in args)
            recipe = _config_from_checkpoint(ckpt, has_config)
            if recipe is not None:
                with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                    f.write(recipe)
                    tmp = f.name
                args = [subcommand, "--config", tmp, *args[1:]]
        return _build_cli_class()(args, weights=ckpt, allow_remote=allow_remote)
    finally:
        if tmp:
            os.unlink(tmp)


def cli_main(args: Sequence[str] | None = None) -> object:
    """Run a ``vlp`` command and return what it made (the LightningCLI, or the result of a
    ``vlp data`` / ``vlp convert`` command), so that Python code and tests can drive the CLI.

    A :class:`~vlp.errors.VLPError` is printed as one ``error: ...`` paragraph and exits with 2,
    also when it was raised inside a constructor that jsonargparse called (it wraps it).
    """
    args = list(sys.argv[1:] if args is None else args)
    try:
        if args and args[0] == "data":
            from vlp.data.commands import data_main

            return data_main(args[1:])
        if args and args[0] == "convert":
            from vlp.convert.commands import convert_main

            return convert_main(args[1:])
        if args and args[0] == "compare":
            from vlp.eval.compare import compare_main

            return compare_main(args[1:])
        if not args or args[0] in LIGHTNING_SUBCOMMANDS or args[0].startswith("-"):
            return lightning_main(args)
        raise VLPError(
            f"unknown command {args[0]!r}; expected one of {', '.join(LIGHTNING_SUBCOMMANDS)}, data, convert, compare"
        )
    except Exception as e:
        found = find_vlp_error(e)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        exit_after_error(2)


def exit_after_error(code: int) -> None:
    """Exit with ``code``. A rank of a distributed run leaves at once (``os._exit``, after
    flushing its output): at interpreter shutdown the process group's threads can still be
    joinable and abort the process (``terminate called without an active exception``, exit
    code -6) instead of returning ``code``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def find_vlp_error(exc: BaseException) -> VLPError | None:
    """``exc`` or the :class:`VLPError` it was raised from (jsonargparse re-raises errors of
    the constructors it calls as ``ValueError``), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, VLPError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main() -> None:
    """Entry point of the ``vlp`` console script."""
    cli_main()


if __name__ == "__main__":
    main()
