"""Command-line plumbing shared by the entry points: dataclass fields become grouped, typed flags."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already says what its default is or the default
    is None: a None default means "decided elsewhere" (a preset, the checkpoint), which the help text states,
    and a printed "(default: None)" would contradict it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def _flag(name: str, flag_prefix: str = "") -> str:
    return "--" + flag_prefix + name.replace("_", "-")


def field_comments(cls: type) -> dict[str, str]:
    """The comment written on each field's own line in dataclass ``cls`` and its dataclass bases (what the
    setting is, e.g. ``max_steps: int = 0  # >0 caps the run``), reused as its command-line help. Comment
    lines above a field say why it is set so, and stay out of the help."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        declared: dict[int, str] = {}  # source line -> the field declared on it
        for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(klass)).readline):
            if tok.type == tokenize.NAME and tok.line.strip().startswith(tok.string + ":") and tok.start[0] not in declared:
                declared[tok.start[0]] = tok.string
            elif tok.type == tokenize.COMMENT and tok.start[0] in declared:
                comments[declared[tok.start[0]]] = tok.string.lstrip("#").strip()
    return comments


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str, prefix: str = "",
                       skip: tuple[str, ...] = (), flag_prefix: str = "") -> None:
    """One flag per field of `cls`, default None so that only what the user typed overrides a preset.

    Booleans get --x/--no-x. Destinations are `prefix + field` so two dataclasses may share names;
    flag_prefix (e.g. 'stage1-') does the same for the flags themselves.
    """
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        explained = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if default is None and explained:  # the field's comment says what None means; "(default: None)" would not
            help_text = explained
        else:
            help_text = f"{explained} (preset or default: {default})" if explained else f"(preset or default: {default})"
        dest = prefix + f.name
        if kind is bool:
            group.add_argument(_flag(f.name, flag_prefix), dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # Optional[X] -> X
        group.add_argument(_flag(f.name, flag_prefix), dest=dest, type=base, default=None, metavar=base.__name__.upper(),
                           help=help_text)


def overrides(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` the user set explicitly."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, prefix + f.name, None)
        if value is not None:
            out[f.name] = value
    return out


def apply(obj: Any, values: dict[str, Any]) -> Any:
    """A copy of dataclass `obj` with `values` replaced."""
    return dataclasses.replace(obj, **values)


def parse_overrides(text: str, cls: type) -> dict[str, Any]:
    """'a=1,b=true' -> {'a': 1, 'b': True}, typed by the fields of dataclass ``cls`` (for benchmark sweeps);
    an unknown field or a malformed item is a ValueError naming it."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"bad override {item!r}: expected FIELD=VALUE with a field of {cls.__name__}")
        kind = next((t for t in typing.get_args(hints[key]) if t is not type(None)), hints[key])  # Optional[X] -> X
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Flags every training entry point shares: where the run lives, resuming, the device."""
    run = parser.add_argument_group("run")
    run.add_argument("--save", required=True, help="run directory (options, logs, checkpoints, samples)")
    run.add_argument("--resume", nargs="?", const="auto", default=None,
                     help="'auto' (or no value): continue from SAVE/checkpoint.pt if present; or a checkpoint path")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun ranks use their local GPU)")
