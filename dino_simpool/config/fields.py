"""The flag machinery: each flag is one dataclass field, and everything else is derived from it.

A field's annotation gives the type (how a command-line token or a YAML value is read); its default is SimPool's
``main_dino.py`` default; its metadata (``Flag``) holds the help text, DINO's value, the embedded-dataset value, the
choices, a range check, and whether the flag changes the result of a run. From these the parser (``add_flags``),
the type coercion and checks (``coerce_fields``, ``check_fields``) and the help texts are derived, so adding a flag
is adding one field. Written here on plain dataclasses + argparse rather than OmegaConf or simple-parsing: the parser
must keep DINO's exact spellings, its aliases, its YAML-over-defaults layering and the one-line errors, and neither
library is a dependency today.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from dino_simpool.cli import bool_flag
from dino_simpool.models.options import Gamma, parse_gamma


class _Unset:
    """Marks a metadata value that is not given (None is a value: ``embedded=None``)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
Check = Callable[[Any], "str | None"]  # value -> an error fragment ("must be >= 0; got -1") or None


@dataclass(frozen=True)
class Flag:
    """What a field says about its flag, beyond its name, type and (SimPool's) default."""

    group: str
    help: str
    dino: Any = UNSET  # DINO's main_dino.py value where it differs: --preset dino, "[DINO: ...]" in --help
    embedded: Any = UNSET  # the value without --data_path (the demo's configuration), "[embedded: ...]"
    shape: bool = False  # a model-shape flag: its embedded value applies only when --arch is not given either
    choices: tuple[str, ...] | None = None  # accepted values, matched in lower case
    check: Check | None = None  # range check, run after coercion (and after the per-family resolution)
    affects_result: bool = True  # False: the run's result does not depend on it (it may differ on a resume)
    aliases: tuple[str, ...] = ()  # extra option strings, e.g. --local-rank
    default_text: str | None = None  # "(default: ...)" where the default is resolved later (per family, per device)


def flag_group(group: str) -> Callable[..., Any]:
    """``model = flag_group("model")``; then ``arch: str = model("resnet50", "backbone", dino="vit_small")``."""
    def flag(default: Any, help: str, **meta: Any) -> Any:
        return dataclasses.field(default=default, metadata={"flag": Flag(group=group, help=help, **meta)})
    return flag


# ---------------------------------------------------------------------- kinds: how one annotated type is read
@dataclass(frozen=True)
class Kind:
    """``parse`` reads a whole value (a flag's token(s) or a YAML value) and raises ValueError with a fragment such
    as "must be an integer; got '1.5'"; ``token`` reads one command-line token; ``nargs`` is argparse's."""

    parse: Callable[[Any], Any]
    token: Callable[[str], Any]
    nargs: int | str | None = None


_NONE_WORDS = {"none", "null", ""}


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"must be an integer; got {v!r}")
    try:
        i = int(v)
    except ValueError:
        raise ValueError(f"must be an integer; got {v!r}") from None
    if isinstance(v, float) and i != v:
        raise ValueError(f"must be an integer; got {v!r}")
    return i


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"must be a number; got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number; got {v!r}") from None


def _bool(v: Any) -> bool:
    try:
        return bool_flag(v)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """None, or the words none/null (numbers only; a path called "None" stays a path)."""
    def read(v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in _NONE_WORDS):
            return None
        return parse(v)
    return read


def _none_or(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else parse(v)


def _pair(v: Any) -> tuple[float, float]:
    try:
        t = tuple(_float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"must be two numbers LOW HIGH; got {v!r}") from None
    if len(t) != 2:
        raise ValueError(f"must be two numbers LOW HIGH; got {v!r}")
    return t  # type: ignore[return-value]


def _ints(v: Any) -> tuple[int, ...]:
    try:
        return tuple(_int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    except ValueError:
        raise ValueError(f"must be positive integers; got {v!r}") from None


KINDS: dict[Any, Kind] = {
    int: Kind(_int, _int),
    float: Kind(_float, _float),
    bool: Kind(_bool, _bool),
    str: Kind(str, str),
    tuple[float, float]: Kind(_pair, _float, nargs=2),
    tuple[int, ...]: Kind(_ints, _int, nargs="+"),
    # the models own gamma's syntax and range; the token is read as text so that a bad gamma is a ValueError of
    # the configuration (exit 2 with its message), as every other range check
    Gamma: Kind(parse_gamma, str),
}


def kind_of(tp: Any) -> Kind:
    """The ``Kind`` of an annotation: one of ``KINDS``, or ``X | None`` of one."""
    if tp in KINDS:
        return KINDS[tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            k = kind_of(rest[0])
            wrap = _none_or if rest[0] is str else _optional
            return Kind(wrap(k.parse), wrap(k.token), k.nargs)
    raise TypeError(f"no flag kind for the annotation {tp!r}; add one to dino_simpool.config.fields.KINDS")


# ---------------------------------------------------------------------- the fields of a config class
@dataclass(frozen=True)
class FlagField:
    name: str
    default: Any
    flag: Flag
    kind: Kind

    def parse(self, v: Any) -> Any:
        """Type coercion plus the choices (lower-cased); ValueError with a fragment."""
        return self._choice(self.kind.parse(v))

    def token(self, s: str) -> Any:
        """argparse ``type=``: one token (syntax and choices), with argparse's one-line error on a bad one."""
        try:
            return self._choice(self.kind.token(s))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def _choice(self, v: Any) -> Any:
        if self.flag.choices is None or v is None:
            return v
        v = str(v).lower()
        if v not in self.flag.choices:
            raise ValueError(f"must be one of {', '.join(self.flag.choices)}; got {v!r}")
        return v


@functools.cache
def flag_fields(cls: type) -> tuple[FlagField, ...]:
    """The fields of ``cls`` that are flags (metadata ``flag``), in declaration order."""
    hints = typing.get_type_hints(cls)
    return tuple(FlagField(f.name, f.default, f.metadata["flag"], kind_of(hints[f.name]))
                 for f in dataclasses.fields(cls) if "flag" in f.metadata)


def flag_error(name: str, fragment: str) -> ValueError:
    """``--lr must be >= 0; got -1`` from the fragment ``must be >= 0; got -1`` (or ``--gamma: <message>``)."""
    return ValueError(f"--{name} {fragment}" if fragment.startswith("must") else f"--{name}: {fragment}")


def coerce_fields(obj: Any) -> None:
    """Read every flag field of ``obj`` in place (YAML gives lists and strings, the command line strings)."""
    for f in flag_fields(type(obj)):
        try:
            setattr(obj, f.name, f.parse(getattr(obj, f.name)))
        except ValueError as e:
            raise flag_error(f.name, str(e)) from None


def check_fields(obj: Any) -> None:
    """Run every field's range check; the first failure raises ValueError naming the flag."""
    for f in flag_fields(type(obj)):
        if f.flag.check is not None:
            problem = f.flag.check(getattr(obj, f.name))
            if problem:
                raise flag_error(f.name, problem)


def plain(v: Any) -> Any:
    """Tuples as lists (YAML, checkpoints and comparisons of stored configs)."""
    return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def values(cls: type, key: str) -> dict[str, Any]:
    """``{name: metadata value}`` for the fields that set ``key`` (``dino`` or ``embedded``), tuples as lists."""
    return {f.name: plain(getattr(f.flag, key)) for f in flag_fields(cls) if getattr(f.flag, key) is not UNSET}


# ---------------------------------------------------------------------- checks (range), used as ``check=``
def at_least(low: float, optional: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        return None if v >= low else f"must be >= {low:g}{' (or left out)' if optional else ''}; got {v}"
    return check


def above(low: float, why: str = "") -> Check:
    return lambda v: None if v > low else f"must be > {low:g}{why}; got {v}"


def within(low: float, high: float, high_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = low <= v < high if high_open else low <= v <= high
        return None if ok else f"must be in [{low:g}, {high:g}{')' if high_open else ']'}; got {v}"
    return check


def scale_range(v: tuple[float, float]) -> str | None:
    return None if 0.0 < v[0] <= v[1] <= 1.0 else f"must be two numbers 0 < LOW <= HIGH <= 1; got {list(v)}"


# ---------------------------------------------------------------------- the parser
def fmt(v: Any) -> str:
    return " ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def help_text(f: FlagField) -> str:
    """help, ``[DINO: x]``, ``(default: y)``, ``[embedded: z]`` (the last only where it differs from y)."""
    text = f.flag.help
    if f.flag.dino is not UNSET:
        text += f" [DINO: {fmt(f.flag.dino)}]"
    default = f.flag.default_text or (None if f.default is None else fmt(f.default))
    if default is not None:
        text += f" (default: {default})"
    if f.flag.embedded is not UNSET and plain(f.flag.embedded) != plain(f.default):
        text += f" [embedded: {fmt(f.flag.embedded)}]"
    return text.replace("%", "%%")


@dataclass(frozen=True)
class Alias:
    """A flag that is not a field of its own (DINO's ``--use_fp16``, SimPool's ``--mode``); folded into fields by
    the layer that reads it."""

    name: str
    after: str  # the field it folds into; listed right after it in --help
    help: str
    token: Callable[[str], Any] = str
    choices: Sequence[str] | None = None


def add_flags(parser: argparse.ArgumentParser, cls: type, groups: Iterable[str],
              aliases: Sequence[Alias] = ()) -> argparse.ArgumentParser:
    """One argument per flag field of ``cls`` (each alias right after its field), in groups ordered as ``groups``."""
    made = {name: parser.add_argument_group(name) for name in groups}
    fields = flag_fields(cls)
    unplaced = sorted({f.flag.group for f in fields} - set(made))
    if unplaced:
        raise TypeError(f"flag groups {unplaced} are not in the parser's group order")
    for group in made:
        for f in fields:
            if f.flag.group != group:
                continue
            metavar = "{" + ",".join(f.flag.choices) + "}" if f.flag.choices else None
            made[group].add_argument(f"--{f.name}", *f.flag.aliases, dest=f.name, type=f.token, nargs=f.kind.nargs,
                                     metavar=metavar, help=help_text(f))
            for a in aliases:
                if a.after == f.name:
                    made[group].add_argument(f"--{a.name}", type=a.token, choices=a.choices,
                                             help=a.help.replace("%", "%%"))
    return parser
