"""The ``checkpointer`` command line: argument parsing, logging, exit codes, and dispatch to the commands.

Exit codes: 0 ok; 1 verification failed or differences found; 2 a usage or input error (the
message says what to do next; no traceback unless ``--verbose``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from checkpointer.errors import CheckpointError, CheckpointFormatError, CheckpointMismatchError
from checkpointer.format.dtypes import SHORT_DTYPES

if TYPE_CHECKING:
    import torch

    from checkpointer.cli.common import Outcome

log = logging.getLogger(__name__)

OK, FAILED, USAGE = 0, 1, 2
CommandAdder = Callable[..., argparse.ArgumentParser]  # build_parser's command(name, summary, run, details)

DESCRIPTION = """\
Look into, check, convert and publish Hugging Face safetensors checkpoints (torchtune/FSDP2
checkpoints written by checkpointer, or any Hugging Face model folder).

Every LOCATION is a local folder, an fsspec URL (s3://bucket/run/epoch_0, gs://..., memory://...)
or hf://namespace/repo[@revision][/subfolder] on the Hugging Face Hub. Remote locations are read
in place: inspect and verify fetch only headers, index and manifest."""

EPILOG = """\
what do you want to know or do?
  what is in this checkpoint?   checkpointer inspect runs/sft/epoch_0           (--json for scripts)
  is it whole?                  checkpointer verify s3://bucket/sft/epoch_0      (--full reads every byte)
  publish it on the Hub         checkpointer push runs/sft/epoch_0 hf://my-org/sft --tag v1
  one model.safetensors         checkpointer consolidate runs/sft/epoch_0 --to out/sft --single-file --dtype bf16
  merge a LoRA checkpoint       checkpointer export runs/lora/step_400 --to out/merged
  what changed?                 checkpointer diff hf://Qwen/Qwen2.5-0.5B runs/sft/epoch_0 --atol 1e-3

`checkpointer COMMAND --help` describes each command's options.
exit codes: 0 ok, 1 verification failed or differences found, 2 usage or input error."""


def _size(value: str) -> str:
    from checkpointer.format.file_layout import parse_size

    try:
        parse_size(value)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"...\"}}'")
    return parsed


LOCATION_HELP = "a local folder, an fsspec URL (s3://, gs://, memory://...) or hf://namespace/repo[@revision][/subfolder]"


def _common_options(remote: bool) -> argparse.ArgumentParser:
    """-q/-v for every command; --storage-options for those that read or write URL locations."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output and remote access")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no log lines (results and errors only)")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging, and a traceback with unexpected errors")
    if remote:
        group.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                           help="fsspec options for URL locations, e.g. an S3 endpoint: '{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}'")  # fmt: skip
    return common


def _add_split(parser: argparse.ArgumentParser, default: str) -> None:
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--single-file", action="store_true", help="write one model.safetensors (no index), whatever the size")
    split.add_argument("--max-shard-size", type=_size, default=default, metavar="SIZE",
                       help=f"largest file to write, in Hugging Face units (5GB, 500MB, 2GiB); default {default}")  # fmt: skip
    parser.add_argument("--dtype", choices=SHORT_DTYPES, help="save floating-point tensors in this dtype (config.json follows); default: as they are")


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing local DEST folder that checkpointer wrote, whole (remote files are always overwritten)")


def _add_hub_publishing(parser: argparse.ArgumentParser) -> None:
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True, help="create a missing Hub repo as private (default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create a missing Hub repo as public")
    parser.add_argument("--message", help="the Hub commit message")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (``checkpointer --help`` is its help)."""
    parser = argparse.ArgumentParser(prog="checkpointer", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    remote, local = _common_options(remote=True), _common_options(remote=False)

    def command(name: str, summary: str, run: Callable[[argparse.Namespace], Any], details: str = "", urls: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary + ("\n\n" + details if details else ""),
                                  parents=[remote if urls else local], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        sub.set_defaults(run=run)
        return sub

    _inspect_parser(command)
    _verify_parser(command)
    _consolidate_parser(command)
    _export_parser(command)
    _push_parser(command)
    _diff_parser(command)
    return parser


def _inspect_parser(command: CommandAdder) -> None:
    sub = command("inspect", "what is in a checkpoint: files, tensors, split, model type, index, manifest, adapter, training state",
                  _run_inspect, "Reads headers, index and manifest only (never whole weight files).")  # fmt: skip
    sub.add_argument("location", metavar="LOCATION", help=LOCATION_HELP)
    sub.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _verify_parser(command: CommandAdder) -> None:
    sub = command("verify", "is a checkpoint whole? exit code 0 if it is, 1 if not (each problem printed with its file and key)", _run_verify,
                  "Checks every file the index names is there, every indexed key is in its file and no key is extra,\n"
                  "every header (strictly), config.json, adapters, training-state files, and sizes (and sha256, with\n"
                  "--full) against checkpointer.json when there is one.")  # fmt: skip
    sub.add_argument("location", metavar="LOCATION", help=LOCATION_HELP)
    sub.add_argument("--full", action="store_true", help="also read every byte: every tensor, and sha256 digests the manifest records")


def _consolidate_parser(command: CommandAdder) -> None:
    sub = command("consolidate", "re-split a checkpoint's weights (e.g. into one model.safetensors) and copy config and tokenizer",
                  _run_consolidate, "Streams tensor by tensor (memory: the largest tensor). --to hf://ns/repo makes ONE commit.")  # fmt: skip
    sub.add_argument("location", metavar="LOCATION", help=LOCATION_HELP)
    sub.add_argument("--to", required=True, metavar="DEST", help="where to write: a new local folder, URL or hf://ns/repo")
    _add_split(sub, "5GB")
    _add_overwrite(sub)
    _add_hub_publishing(sub)


def _export_parser(command: CommandAdder) -> None:
    from checkpointer.mapping.key_maps import KEY_MAPS

    sub = command("export", "turn an intermediate checkpoint (LoRA adapter, or DCP weights) into plain Hugging Face weights", _run_export,
                  "A checkpoint holding only a LoRA adapter (adapter_model.safetensors) is merged into its base\n"
                  "(--base, default: base_model_name_or_path of adapter_config.json), tensor by tensor.\n"
                  "A DCP checkpoint (dcp.save / torchtune's DistributedCheckpointer, any world size) is read without a\n"
                  "process group and written with --model-type's key map; config.json and tokenizer come from --base.")  # fmt: skip
    sub.add_argument("checkpoint", metavar="CHECKPOINT", help="the intermediate checkpoint: " + LOCATION_HELP)
    sub.add_argument("--to", required=True, metavar="DEST", help="where to write: a new local folder, URL or hf://ns/repo")
    sub.add_argument("--base", metavar="BASE", help="the base model (folder, URL, hf://ns/repo or a bare repo id)")
    sub.add_argument("--model-type", choices=sorted(KEY_MAPS), type=str.upper, help="torchtune model type of a DCP checkpoint")
    sub.add_argument("--trust-pickle", action="store_true",
                     help="read DCP's default pickled .metadata (unpickling runs code: only for checkpoints you trust)")  # fmt: skip
    _add_split(sub, "5GB")
    _add_overwrite(sub)
    _add_hub_publishing(sub)


def _push_parser(command: CommandAdder) -> None:
    sub = command("push", "publish a local folder to the Hub as ONE commit with a model card; prints the commit URL", _run_push,
                  "The repo (and branch) is created if missing. The folder is verified first (headers only).", urls=False)  # fmt: skip
    sub.add_argument("local", metavar="LOCAL", help="a local checkpoint folder")
    sub.add_argument("repo", metavar="REPO", help="hf://namespace/repo[@branch][/subfolder]")
    sub.add_argument("--revision", metavar="BRANCH", help="the branch to commit to (default main)")
    sub.add_argument("--tag", help="tag the commit (an existing tag of that name is moved)")
    sub.add_argument("--no-verify", dest="check_first", action="store_false", help="push even if verify finds problems")
    _add_hub_publishing(sub)


def _diff_parser(command: CommandAdder) -> None:
    sub = command("diff", "which tensors differ between two checkpoints: missing keys, dtype/shape changes, max abs and relative L2",
                  _run_diff, "Exit code 0 when nothing differs by more than --atol, 1 otherwise.")  # fmt: skip
    sub.add_argument("a", metavar="A", help=LOCATION_HELP)
    sub.add_argument("b", metavar="B", help="the other checkpoint, anywhere")
    sub.add_argument("--atol", type=float, default=0.0, help="values differing by at most this count as equal (default 0: bitwise)")
    sub.add_argument("--json", action="store_true", help="print one JSON object instead of text")


# ---- dispatch: arguments -> the command functions ----------------------------------------------------


def _dtype(name: str | None) -> torch.dtype | None:
    return SHORT_DTYPES[name] if name else None


def _shard_size(args: argparse.Namespace) -> int | str:
    return sys.maxsize if args.single_file else args.max_shard_size


def _run_inspect(args: argparse.Namespace) -> Outcome:
    from checkpointer.cli.inspect import inspect

    return inspect(args.location, args.json, args.storage_options)


def _run_verify(args: argparse.Namespace) -> Outcome:
    from checkpointer.cli.verify import verify

    return verify(args.location, args.full, args.storage_options)


def _run_consolidate(args: argparse.Namespace) -> Outcome:
    from checkpointer.cli.consolidate import consolidate

    return consolidate(args.location, args.to, _shard_size(args), _dtype(args.dtype), private=args.private, message=args.message,
                       overwrite=args.overwrite, storage_options=args.storage_options)  # fmt: skip


def _run_export(args: argparse.Namespace) -> Outcome:
    from checkpointer.cli.export import ExportOptions, export

    options = ExportOptions(args.to, args.base, args.model_type, _dtype(args.dtype), _shard_size(args), args.trust_pickle,
                            args.private, args.message, args.overwrite, args.storage_options)  # fmt: skip
    return export(args.checkpoint, options)


def _run_push(args: argparse.Namespace) -> Outcome:
    from checkpointer.cli.push import push

    return push(args.local, args.repo, revision=args.revision, tag=args.tag, private=args.private, message=args.message,
                check_first=args.check_first)  # fmt: skip


def _run_diff(args: argparse.Namespace) -> Outcome:
    from checkpointer.cli.diff import diff

    return diff(args.a, args.b, args.atol, args.json, args.storage_options)


# ---- running: logging, progress, errors -> exit codes ------------------------------------------------

_NEXT_STEP = {
    CheckpointFormatError: "`checkpointer verify` on it lists every problem",
    CheckpointMismatchError: "`checkpointer inspect` shows the keys and the model type they look like",
}


@contextlib.contextmanager
def _logging(verbose: bool, quiet: bool) -> Iterator[None]:
    """torchtune's convention: ``logging`` by module name; here INFO and up to stderr for the duration of a command."""
    from checkpointer.runtime.progress import progress_bars

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    logger = logging.getLogger("checkpointer")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    try:
        with progress_bars(False) if quiet else contextlib.nullcontext(), _hub_bars(not quiet):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@contextlib.contextmanager
def _hub_bars(show: bool) -> Iterator[None]:
    """huggingface_hub's own download/upload bars follow --quiet too."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not show:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            enable_progress_bars()


def _error_message(error: BaseException) -> str:
    hint = next((h for cls, h in _NEXT_STEP.items() if isinstance(error, cls)), None)
    text = str(error) or type(error).__name__
    return f"{text} ({hint})" if hint and "`checkpointer" not in text else text


def _run(args: argparse.Namespace) -> int:
    try:
        outcome = args.run(args)
    except CheckpointError as e:
        log.error("%s", _error_message(e))
        return USAGE
    except BrokenPipeError:  # e.g. `checkpointer inspect x | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    except OSError as e:
        log.error("%s: check the path and its permissions", e)
        return USAGE
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - never a traceback for an input we did not foresee
        log.error("%s: %s (rerun with --verbose for the traceback; if the input looks right, please report it)", type(e).__name__, e)
        log.debug("traceback", exc_info=True)
        return USAGE
    log.info("%s", outcome.summary)
    return outcome.code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    with _logging(args.verbose, args.quiet):
        return _run(args)


if __name__ == "__main__":
    sys.exit(main())
