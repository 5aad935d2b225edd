"""Kernel config fragments (``kernel_configs/*.config``) and what ``make olddefconfig``
made of them.

A build fragment sets each option to one value (``CONFIG_X=y``, ``CONFIG_X="text"``,
``# CONFIG_X is not set``). ``olddefconfig`` silently drops a value whose dependencies are
unmet, so after it every option of the fragment is checked against the resulting
``.config`` (:func:`unmet`), and a failure names the option, the fragment and what the
option depends on (:func:`kconfig_dependencies`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harness.errors import ImageError

_OPTION: Final = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET: Final = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Options of a kernel ``.config`` (or fragment) text: name -> value, ``"n"`` for
    ``# CONFIG_X is not set``; other lines are ignored."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if match := _OPTION.match(line):
            options[match[1]] = match[2]
        elif match := _UNSET.match(line):
            options[match[1]] = "n"
    return options


@dataclass(frozen=True)
class Fragment:
    """A build fragment: options with exactly one value each.

    :param path: the fragment file
    :param options: option -> value (``"n"``: not set), in file order
    """

    path: Path
    options: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> Fragment:
        """Read and validate ``path``.

        :raise ImageError: naming the file and line of anything that is not an option,
            a comment or a blank line, of a value with alternatives (``y|m`` is for
            checks such as ``root-cell.config``), and of an option set twice
        """
        try:
            text = path.read_text()
        except OSError as exc:
            raise ImageError(f"kernel config fragment {path}: {exc.strerror}") from exc
        options: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            where = f"{path}:{number}"
            if match := _UNSET.match(line):
                name, value = match[1], "n"
            elif line.startswith("#") or not line:
                continue
            elif match := _OPTION.match(line):
                name, value = match[1], match[2]
                if "|" in value and not value.startswith('"'):
                    raise ImageError(f"{where}: {name}={value} lists alternatives; a build "
                                     "fragment needs one value (write y, m, n or a string)")
                if value == "n":
                    raise ImageError(f"{where}: write '# {name} is not set' to turn {name} off")
            else:
                raise ImageError(f"{where}: not a kernel option: {line!r} (expected CONFIG_X=value "
                                 "or '# CONFIG_X is not set')")
            if name in options:
                raise ImageError(f"{where}: {name} is set twice in the fragment")
            options[name] = value
        if not options:
            raise ImageError(f"kernel config fragment {path} sets no option")
        return cls(path, options)

    def text(self) -> str:
        """The fragment as ``.config`` lines (appended to a base config before
        ``olddefconfig``)."""
        lines = [f"# {name} is not set" if value == "n" else f"{name}={value}"
                 for name, value in self.options.items()]
        return "\n".join(lines) + "\n"


def unmet(fragments: list[Fragment], config: dict[str, str]) -> list[str]:
    """Options of ``fragments`` whose value ``config`` does not have, each as
    ``"CONFIG_X=y (kernel_configs/f.config): olddefconfig gave n"``."""
    problems = []
    for fragment in fragments:
        for name, wanted in fragment.options.items():
            have = config.get(name, "n")
            if have != wanted:
                problems.append(f"{name}={wanted} ({fragment.path.name}): olddefconfig gave {have}")
    return problems


def config_changes(base: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Options whose value differs between two configs: name -> (base value, new value)."""
    names = sorted(set(base) | set(new))
    return {name: (base.get(name, "n"), new.get(name, "n")) for name in names
            if base.get(name, "n") != new.get(name, "n")}


def kconfig_dependencies(srctree: Path, names: list[str]) -> dict[str, list[str]]:
    """The ``depends on`` lines of each option in the Kconfig files of ``srctree``, with
    the file they are in (for an error that says why an option did not survive; the
    ``if`` blocks around an entry add to them)."""
    wanted = {name.removeprefix("CONFIG_") for name in names}
    found: dict[str, list[str]] = {f"CONFIG_{name}": [] for name in wanted}
    for kconfig in sorted(srctree.rglob("Kconfig*")):
        try:
            text = kconfig.read_text(errors="replace")
        except OSError:
            continue
        current: str | None = None
        in_help = False
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith(("config ", "menuconfig ")):
                symbol = line.split()[1]
                current, in_help = (symbol if symbol in wanted else None), False
            elif line and not raw[0].isspace():
                current = None  # another top-level entry (choice, if, source, menu, ...)
            elif current is not None and not in_help:
                if line in ("help", "---help---"):
                    in_help = True
                elif line.startswith("depends on "):
                    where = kconfig.relative_to(srctree).as_posix()
                    found[f"CONFIG_{current}"].append(f"{line} ({where})")
    return found
