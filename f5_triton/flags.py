"""Command-line flags and environment names made from a section of the serving configuration (a dataclass of
`config.setting` fields): the repository builder's (`repository.repository_flags`, `F5_REPO_<FLAG>`) and `f5-triton
serve`'s (`config.ServerConfig`: HTTP_PORT, F5_TRITON_HOST, ...)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from f5_triton.config import parse_bool


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers ("0,1")."""
    return [int(x) for x in text.split(",")]


_KINDS = {"int": int, "float": float, "str": str, "Path": Path, "list[int]": int_list}
_WHAT = {int: "an integer", float: "a number", int_list: "comma-separated integers"}


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a setting (`part`: the section field or limit it sets, if any; `env`: the environment
    name that sets it too, if any)."""

    option: str
    part: str | None
    dest: str
    kwargs: dict
    env: str | None = None

    @property
    def name(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        return self.kwargs.get("action") is argparse.BooleanOptionalAction

    def parse(self, text: str):
        """`text` (the environment's value) as the flag's value, or a ValueError naming `env` and what it must be."""
        if self.is_switch:
            try:
                return parse_bool(text)
            except ValueError:
                raise ValueError(f"{self.env} must be true or false (1/yes/on or 0/no/off), got {text!r}") from None
        kind = self.kwargs.get("type", str)
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{self.env} must be {_WHAT.get(kind, kind.__name__)}, got {text!r}") from None
        choices = self.kwargs.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{self.env} must be one of {', '.join(map(str, choices))}, got {text!r}")
        return value

    def arguments(self, value) -> list[str]:
        """The command-line arguments that give the flag `value` (typed, or as the environment writes it)."""
        if self.is_switch:
            return [self.name if parse_bool(value) else "--no-" + self.name[2:]]
        return [self.name, ",".join(map(str, value)) if isinstance(value, list) else str(value)]


def flag_kwargs(kind: str | type, default, meta: Mapping) -> dict:
    """argparse keywords of a setting of type `kind` (a field's annotation) with its `default` and metadata."""
    kind = (kind if isinstance(kind, str) else kind.__name__).removesuffix(" | None")
    kwargs = {"default": list(default) if isinstance(default, list) else default, "help": meta["help"]}
    kwargs.update((key, meta[key]) for key in ("choices", "required") if key in meta)
    if kind == "bool":
        return {**kwargs, "action": argparse.BooleanOptionalAction}
    return {**kwargs, "type": _KINDS[kind]}


def environment_name(meta: Mapping, dest: str, prefix: str | None) -> str | None:
    """The environment name of a setting: its `environ` (a name, or False: none), else `<prefix><FLAG>` where the
    flags have a prefix."""
    environ = meta.get("environ", True)
    if isinstance(environ, str):
        return environ
    return f"{prefix}{dest.upper()}" if environ and prefix is not None else None


def field_flag(f: dataclasses.Field, help: str | None = None, prefix: str | None = None) -> Flag | None:
    """The flag of a `config.setting` field (None where its `flag` is None), its help `help` if given."""
    dest = f.metadata.get("flag", f.name)
    if dest is None:
        return None
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return Flag(f.name, None, dest, flag_kwargs(f.type, default, {**f.metadata, "help": help or f.metadata["help"]}),
                environment_name(f.metadata, dest, prefix))


def setting_flags(settings: type) -> list[Flag]:
    """A flag for each field of `settings` (a dataclass of `config.setting` fields), its environment name (no prefix:
    only those a field names) in its help."""
    flags = [flag for flag in map(field_flag, dataclasses.fields(settings)) if flag is not None]
    return [dataclasses.replace(flag, kwargs={**flag.kwargs, "help": f"{flag.kwargs['help']} ({flag.env} sets it too)"})
            if flag.env else flag for flag in flags]


class _FromEnvironment(str):
    """A flag's default as the environment gives it: argparse converts a string default with the flag's type only
    when the command runs without the flag, so a bad value fails that command alone."""


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag],
              environ: Mapping[str, str] | None = None) -> None:
    """Each flag as an argument of `parser`; with `environ`, a flag's environment name, where set, gives its default
    (a bad value is the command's error, naming the flag and the name)."""
    for flag in flags:
        action = parser.add_argument(flag.name, dest=flag.dest, **flag.kwargs)
        value = environ.get(flag.env, "") if environ is not None and flag.env else ""
        if value:
            action.default = _FromEnvironment(value)
            action.type = _environment_type(flag, action.type)


def _environment_type(flag: Flag, kind):
    def convert(text: str):
        if isinstance(text, _FromEnvironment):
            try:
                return flag.parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return kind(text) if kind is not None else text

    convert.__name__ = getattr(kind, "__name__", "value")  # argparse's "invalid int value" for a bad flag
    return convert


def flags_values(flags: Iterable[Flag], args: argparse.Namespace) -> dict:
    """Each flag's option -> its value in `args` (parsed from :func:`add_flags`' arguments)."""
    return {flag.option: getattr(args, flag.dest) for flag in flags}


def environment_setting(defaults, name: str, environ: Mapping[str, str]):
    """The setting `name` of the section `defaults` (an instance): its environment name's value where `environ`
    sets it (typed; a ValueError naming the name if it is not one), else its default."""
    flag = next(flag for flag in setting_flags(type(defaults)) if flag.option == name)
    value = environ.get(flag.env, "") if flag.env else ""
    return flag.parse(value) if value else getattr(defaults, name)
