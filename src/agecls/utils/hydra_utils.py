"""Small helpers shared by the entry points: config location, instantiation, flat hparams."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def config_dir() -> str:
    """The `conf/` folder: $AGECLS_CONFIG_DIR, else the checkout's conf/ beside src/."""
    env = os.environ.get("AGECLS_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "conf"
    if not (path / "train.yaml").exists():
        raise FileNotFoundError(
            f"agecls's Hydra configs are not at {path}. Install agecls from its checkout "
            "(pip install -e .) or set AGECLS_CONFIG_DIR to the folder holding train.yaml."
        )
    return str(path)


def to_dict(node: Any) -> Any:
    """A resolved plain container (dict/list) from a config node; None stays None."""
    if node is None:
        return None
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but an agecls error raised while building (a PretrainedWeightsError,
    a ConfigValueError, ... : user_error) comes out as itself, not wrapped in Hydra's
    InstantiationException, whose message is the error's repr (its lines joined by a literal \\n)."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if cause is None or user_error(cause) is not cause:
            raise
        raise cause from None


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    callbacks: list[Callback] = []
    for name, node in (cfg or {}).items():
        if node is not None and "_target_" in node:
            log.debug("callback %s: %s", name, node._target_)
            callback = hydra.utils.instantiate(node)
            if callback is not None:  # a factory may decline (callbacks.ema with decay null)
                callbacks.append(callback)
    return callbacks


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    loggers: list[Logger] = []
    for _, node in (cfg or {}).items():
        if node is not None and "_target_" in node:
            loggers.append(hydra.utils.instantiate(node))
    return loggers


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The knobs a comparison of runs cares about, flat, for TensorBoard's HParams tab and summaries."""
    freeze = cfg.get("freeze")
    out: dict[str, Any] = {
        "backbone": cfg.backbone.name,
        "head": cfg.head.name,
        "loss": loss_choice(cfg)[0],
        "freeze": str(freeze).lower() if isinstance(freeze, bool) else str(freeze),
        "pretrained": bool(cfg.pretrained),
        "optimizer": str(cfg.optimizer._target_).rsplit(".", 1)[-1].lower(),
        "lr": float(cfg.lr),
        "scheduler": (str(cfg.scheduler._target_).rsplit(".", 1)[-1] if cfg.get("scheduler") and cfg.scheduler.get("_target_") else "none"),
        "data": cfg.data.source,
        "image_size": int(cfg.data.image_size),
        "batch_size": int(cfg.data.batch_size),
        "augment": bool(cfg.data.augment.enabled) if cfg.data.get("augment") else False,
        "max_epochs": int(cfg.trainer.max_epochs) if cfg.trainer.get("max_epochs") is not None else -1,
        "seed": int(cfg.seed) if cfg.get("seed") is not None else -1,
        "precision": str(cfg.trainer.get("precision", "32-true")),
        "tta": str(cfg.get("tta") or "none"),  # test-time augmentation of the test stage
    }
    return out


def loss_choice(cfg: DictConfig) -> tuple[str, int]:
    """(loss= name, the head's output width it needs) of a config; a config without the loss group
    trains with the study's l1."""
    from agecls.models.losses import build_loss, loss_name  # imported here: it needs torch

    loss = to_dict(cfg.get("loss"))
    return loss_name(loss), build_loss(loss).out_features


def metric_value(metrics: Mapping[str, Any], name: str | None) -> float | None:
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {', '.join(sorted(metrics))}")
    value = metrics[name]
    return float(value.item() if hasattr(value, "item") else value)


def summary_line(cfg: DictConfig, fields: Mapping[str, str]) -> str:
    """`label=value, ...` for the dotted config keys in `fields` ({label: key}); unset ones left out."""
    parts = []
    for label, key in fields.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        parts.append(f"{label}={value}")
    return ", ".join(parts)


def train_summary(cfg: DictConfig) -> str:
    """One line with a training run's key choices; the whole resolved config is in
    <run dir>/.hydra/config.yaml (and `--cfg job` prints it)."""
    hp = flat_hparams(cfg)
    items = {k: hp[k] for k in ("backbone", "pretrained", "head", "loss")}
    items["head_output"] = loss_choice(cfg)[1]
    items.update({k: hp[k] for k in ("freeze", "optimizer", "lr", "scheduler")})
    items.update(data=hp["data"], root=cfg.data.get("root"), image_size=hp["image_size"], batch_size=hp["batch_size"],
                 max_epochs=hp["max_epochs"], precision=hp["precision"], accelerator=cfg.trainer.get("accelerator"),
                 seed=hp["seed"], output_dir=cfg.paths.output_dir)
    if not cfg.get("train", True) or not cfg.get("test", True):
        items.update(train=bool(cfg.get("train", True)), test=bool(cfg.get("test", True)))
    if hp["tta"] != "none":
        items["tta"] = hp["tta"]
    if cfg.get("ckpt_path"):
        items["ckpt_path"] = cfg.ckpt_path
    return ", ".join(f"{k}={v}" for k, v in items.items())


def progress_bar_enabled(setting: bool | None, callbacks: list[Callback] = ()) -> bool:
    """trainer.enable_progress_bar: null = only when stdout is a terminal. Elsewhere (nohup, SLURM,
    a pipe) Rich's bar prints just its last frame; the per-epoch lines of EpochSummary remain."""
    from lightning.pytorch.callbacks import ProgressBar

    if any(isinstance(cb, ProgressBar) for cb in callbacks):
        return True  # one was configured explicitly
    if setting is None:
        return bool(getattr(sys.stdout, "isatty", lambda: False)())
    return bool(setting)


# The key choices agecls.eval logs in its one-line summary ({label: config key}).
EVAL_SUMMARY = {
    "ckpt_path": "ckpt_path",
    "split": "eval.split",
    "tta": "tta",
    "crop_pct": "eval.crop_pct",
    "data": "data.source",
    "root": "data.root",
    "batch_size": "eval.batch_size",
    "accelerator": "trainer.accelerator",
    "precision": "trainer.precision",
    "output_dir": "paths.output_dir",
}


# ------------------------------------------------------------------------------- entry points
# `--help` and errors of every command. Each entry point's main is decorated once:
#
#     @entry_point
#     @hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
#     def main(cfg: DictConfig) -> None: ...
#
# (a plain `main(argv)`, as agecls.report's, gets the same error handling.)

HELP_FLAGS = ("-h", "--help")

# Errors whose message is the whole story: agecls's own classes (ConfigValueError, CheckpointError,
# PretrainedWeightsError, SplitError, ...: any class defined in an agecls module), a mandatory key
# left out (`???`), and a missing or unwritable file that agecls's own code refused.
_FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _raised_in_agecls(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and str(last.tb_frame.f_globals.get("__name__", "")).startswith("agecls")


def user_error(err: BaseException) -> BaseException | None:
    """The error to report as one paragraph (no traceback), or None for any other exception (a bug,
    a library's failure: its traceback is the useful part). Hydra's wrapper around a failed
    `instantiate` (whose message is the repr of the real error, newlines as \\n) is unwrapped."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return user_error(err.__cause__)
    if isinstance(err, MissingMandatoryValue):
        return err
    if type(err).__module__.startswith("agecls"):
        return err
    if isinstance(err, _FILE_ERRORS) and _raised_in_agecls(err):
        return err
    return None


def error_paragraph(err: BaseException, prog: str) -> str:
    """`prog: message` and how to see the traceback: the paragraph a user error prints."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or str(err).split(":")[-1].strip()
        message = f"{key} is required: add {key}=... to the command (`{prog} --help` lists the options)."
    else:
        message = str(err).strip() or type(err).__name__
    return f"{prog}: {message}\n(HYDRA_FULL_ERROR=1 shows where it was raised.)"


def _prog(task: Callable[..., Any]) -> str:
    """How the command was called: its console script (agecls-train), else `python -m agecls.<name>`."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if script.startswith("agecls-"):
        return script
    module = sys.modules.get(task.__module__)
    spec = getattr(module, "__spec__", None)
    name = spec.name if spec is not None and spec.name != "__main__" else task.__module__
    return f"python -m {name}" if name.startswith("agecls") else Path(sys.argv[0]).name


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def report_user_errors(task: Callable[..., Any], prog: str | None = None) -> Callable[..., Any]:
    """`task` that, for a user error (user_error), prints one paragraph to stderr and exits with
    code 2 instead of a traceback. HYDRA_FULL_ERROR=1 keeps the traceback; a job of a multirun
    re-raises (the sweep records the failure and goes on as Hydra decides)."""

    @functools.wraps(task)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as err:
            shown = user_error(err)
            if shown is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            paragraph = error_paragraph(shown, prog or _prog(task))
            if _multirun():
                log.error("%s", paragraph)
                raise
            sys.stdout.flush()
            print(paragraph, file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return guarded


def entry_point(main: Callable[..., Any]) -> Callable[..., Any]:
    """The decorator of every command's `main`, placed above `@hydra.main(...)`: `--help` prints the
    command's own options (command_help) and exits 0; agecls's own errors print one paragraph and
    exit 2 (report_user_errors). A `main` without @hydra.main (a plain `main(argv)`) gets the error
    handling only. Called with a config, `main(cfg)` runs the task directly, as Hydra's does."""
    # @hydra.main catches whatever its task raises and prints a traceback before our code could see
    # it; so the task (its __wrapped__) is guarded and put under a new hydra.main with the same
    # config_path and config_name (read from the closure of the one below this decorator).
    hydra_args = inspect.getclosurevars(main).nonlocals if hasattr(main, "__wrapped__") else {}
    if "config_name" not in hydra_args:
        return report_user_errors(main)
    task = main.__wrapped__
    config_name = hydra_args["config_name"]
    rebuilt = hydra.main(version_base="1.3", config_path=hydra_args.get("config_path") or config_dir(),
                         config_name=config_name)(report_user_errors(task))

    @functools.wraps(task)
    def run(cfg_passthrough: DictConfig | None = None) -> Any:
        if cfg_passthrough is not None:
            return task(cfg_passthrough)
        if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
            print(command_help(config_name, _prog(task), sys.modules.get(task.__module__).__doc__))
            raise SystemExit(0)
        return rebuilt()

    return run


# ------------------------------------------------------------------------------------ --help
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*)\s*:(?:\s+(?P<rest>.*))?$")
_DEFAULT = re.compile(r"^\s*-\s*(?:override\s+)?/?(?P<group>[\w/]+)\s*:\s*(?P<option>[\w.-]+)\s*(?:#\s*(?P<comment>.*))?$")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]`'\"])[.;]\s+(?=[A-Z(`])")
_SKIPPED = ("defaults", "hydra", "task_name")


def _split_comment(text: str) -> tuple[str, str, int]:
    """(value, comment, column of its `#` or -1) of the text after `key:` (quotes respected)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip(), i
    return text.strip(), "", -1


def yaml_options(path: str | Path) -> list[tuple[str, str, str]]:
    """(dotted key, default as written, its comment) of every value of a Hydra yaml file. The comment
    is the one after the value (with the comment lines below it aligned with it), else the block of
    comment lines right above the key. `defaults`, `hydra` and `task_name` are left out."""
    options: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    last: list[Any] | None = None  # [key, value, comment, column of the trailing comment]
    for line in Path(path).read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("-"):
            above, last = [], None if not stripped else last
            continue
        if stripped.startswith("#"):
            text = stripped[1:].strip()
            column = len(line) - len(line.lstrip())
            if last is not None and last[3] >= 0 and column >= last[3] - 2:
                last[2] = f"{last[2]} {text}".strip()
            elif not text.startswith("@package"):
                above.append(text)
            continue
        match = _KEY.match(line)
        if not match:
            above, last = [], None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value, comment, column = _split_comment(match["rest"] or "")
        keys = [k for _, k in stack] + [match["key"]]
        if not value:  # a mapping (or a list) follows
            stack.append((indent, match["key"]))
            above, last = [], None
            continue
        if keys[0] in _SKIPPED:
            above, last = [], None
            continue
        last = [".".join(keys), value, comment or " ".join(above), match.start("rest") + column if column >= 0 else -1]
        options.append(last)
        above = []
    return [(k, v, c) for k, v, c, _ in options]


def _one_line(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    text = _SENTENCE_END.split(text, maxsplit=1)[0].rstrip(".")
    return text if len(text) <= width else text[: width - 1].rsplit(" ", 1)[0] + " ..."


def _defaults(path: Path) -> list[tuple[str, str, str]]:
    """(group, option, comment) of a yaml file's defaults list (not _self_, not `group@package`)."""
    out, inside = [], False
    for line in path.read_text().splitlines():
        if re.match(r"^defaults\s*:", line):
            inside = True
            continue
        if inside and line and not line.startswith((" ", "-", "#")):
            break
        match = _DEFAULT.match(line) if inside else None
        if match:
            out.append((match["group"], match["option"], match["comment"] or ""))
    return out


def _is_global_package(path: Path) -> bool:
    for line in path.read_text().splitlines():
        if line.strip():
            return line.strip().replace(" ", "") == "#@package_global_"
    return False


def _option_rows(options: list[tuple[str, str, str]]) -> list[str]:
    return _rows([(f"{k}={v}", ("required" + ("; " if c else "") if v == "???" else "") + _one_line(c))
                  for k, v, c in options])


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    width = min(30, max((len(a) for a, _ in rows), default=0))
    return [f"  {a:<{width}}  {b}".rstrip() if len(a) <= width else f"  {a}\n  {'':<{width}}  {b}".rstrip()
            for a, b in rows]


def command_help(config_name: str, prog: str, doc: str | None = None, conf: str | Path | None = None) -> str:
    """`--help` of a command: its own options (conf/<config_name>.yaml) with their one-line
    descriptions, those of the `@package _global_` files its defaults list pulls in (such as
    conf/estimator/default.yaml), and its config groups with their choices."""
    conf = Path(conf or config_dir())
    path = conf / f"{config_name}.yaml"
    lines = [f"usage: {prog} [key=value ...]", ""]
    if doc:
        lines += [doc.strip().split("\n\n")[0].strip(), ""]
    lines += [f"Options (conf/{config_name}.yaml; key=default):"]
    lines += _option_rows(yaml_options(path))
    groups = []
    for group, option, comment in _defaults(path):
        if group in ("hydra",):
            continue
        file = conf / group / f"{option}.yaml"
        if option != "null" and file.is_file() and _is_global_package(file):
            lines += ["", f"Options from conf/{group}/{option}.yaml:"]
            lines += _option_rows(yaml_options(file))
            continue
        choices = sorted(p.stem for p in (conf / group).glob("*.yaml") if not p.stem.startswith("_"))
        if len(choices) <= 1 and not comment:  # nothing to choose (paths=default)
            continue
        text = _one_line(comment) if comment else ""
        groups.append((f"{group}={option}", (text + "; " if text else "") + "choices: " + ", ".join(choices)))
    if groups:
        lines += ["", "Config groups (group=choice; then group.key=value sets one of its values):"] + _rows(groups)
    sweep = "; -m runs a sweep (key=a,b,...)" if config_name == "train" else ""
    lines += ["", f"`{prog} --cfg job` prints the composed config{sweep}; --hydra-help: Hydra's own flags."]
    return "\n".join(lines)
