"""Value types of trainer config keys: what a key accepts, checked when a file or `--set` sets it.

A `Spec` names the accepted types, whether null is allowed, a numeric range and/or a fixed set of
choices. `check` returns the value (ints widened to float where a float is meant) or raises
ConfigError naming the key, the expected type and the value given, so no bad value reaches the
code that uses it (and no traceback reaches the user).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.errors import UserError


class ConfigError(UserError):
    """A config file or override names an unknown key or holds a bad value."""


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list"}


@dataclass(frozen=True)
class Spec:
    kind: type  # int, float, str, bool or list
    nullable: bool = False  # null accepted (meaning documented with the default)
    min: float | None = None
    max: float | None = None
    choices: tuple = ()
    also: tuple = ()  # further literal values accepted (wandb.enabled: "auto")
    exclusive_min: bool = False
    exclusive_max: bool = False

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = _NAMES[self.kind]
            if self.min is not None and self.max is not None:
                low = "(" if self.exclusive_min else "["
                high = ")" if self.exclusive_max else "]"
                text += f" in {low}{self.min}, {self.max}{high}"
            elif self.min is not None:
                text += f" {'>' if self.exclusive_min else '>='} {self.min}"
        if self.also:
            text += " or " + " or ".join(repr(a) for a in self.also)
        return text + (" or null" if self.nullable else "")

    def check(self, key: str, value: Any, source: str) -> Any:
        if value is None and self.nullable:
            return None
        if value in self.also and not isinstance(value, bool):
            return value
        given = value  # the error quotes what the user wrote, not its widened form
        ok = isinstance(value, self.kind) and (self.kind is bool or not isinstance(value, bool))
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if ok and self.choices and value not in self.choices:
            ok = False
        if ok and self.kind in (int, float):
            low_bad = self.min is not None and (value <= self.min if self.exclusive_min else value < self.min)
            high_bad = self.max is not None and (value >= self.max if self.exclusive_max else value > self.max)
            ok = not low_bad and not high_bad
        if not ok:
            raise ConfigError(f"{source}: '{key}' must be {self.describe()}, got {given!r}")
        return value


def Int(min: int | None = None, max: int | None = None, nullable: bool = False) -> Spec:
    return Spec(int, nullable, min, max)


def Float(min: float | None = None, max: float | None = None, nullable: bool = False,
          exclusive_min: bool = False, exclusive_max: bool = False) -> Spec:
    return Spec(float, nullable, min, max, exclusive_min=exclusive_min, exclusive_max=exclusive_max)


def Str(nullable: bool = False) -> Spec:
    return Spec(str, nullable)


def Bool(nullable: bool = False) -> Spec:
    return Spec(bool, nullable)


def List() -> Spec:
    return Spec(list)


def Choice(*choices: str, nullable: bool = False) -> Spec:
    return Spec(str, nullable, choices=choices)
