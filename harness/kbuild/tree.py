"""One out-of-tree build (``make O=...``) of Debian's kernel source: configure from a base
and fragments, check that the fragments survived, run targets.

The source tree is shared and never written; each build has its own object folder in a
temporary directory of the cache, removed when the build ends (successful or not). The
build's log is kept in ``images/kbuild-logs/`` either way.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from harness.errors import ImageError
from harness.recipes import find_recipes

from .debian import SourceTree, images_dir
from .kconfig import Fragment, kconfig_dependencies, parse_config, unmet
from .process import BuildLog

#: seconds a configuration step (``allnoconfig``, ``olddefconfig``) may take
CONFIG_TIMEOUT: Final = 600.0
#: fixed build identity, so that two builds of the same inputs print the same version
BUILD_ENV: Final = {"KBUILD_BUILD_USER": "jhlab", "KBUILD_BUILD_HOST": "jhlab",
                    "KBUILD_BUILD_TIMESTAMP": "1970-01-01 00:00:00 UTC"}


class KernelConfigError(ImageError):
    """Fragment options did not survive ``make olddefconfig``.

    :param problems: one line per option (wanted value, fragment, value got)
    :param log: the build log (it holds the resulting ``.config``)
    """

    def __init__(self, problems: list[str], depends: dict[str, list[str]], log: Path) -> None:
        self.problems = problems
        self.log = log
        lines = [f"{len(problems)} option(s) of the kernel config fragment did not survive "
                 "'make olddefconfig' (their dependencies are not met):"]
        for problem in problems:
            lines.append(f"  {problem}")
            lines.extend(f"      {dep}" for dep in depends.get(problem.split("=", 1)[0], []))
        lines.append("Set what they depend on in the fragment (in "
                     f"{find_recipes().kernel_configs}); an option turned on against the "
                     "fragment is selected by another one (or has no "
                     f"prompt). Resulting .config: in the build log {log}")
        super().__init__("\n".join(lines))


def artefact_key(*parts: str | bytes) -> str:
    """A cache key: the first 16 hex digits of the SHA-256 of ``parts``."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def log_path(artefact: str) -> Path:
    """Where the build log of ``artefact`` goes (kept after failures)."""
    return images_dir() / "kbuild-logs" / f"{artefact}.log"


def jobs() -> int:
    """Parallel compile jobs: the CPUs this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


class TreeBuild:
    """``make -C SOURCE O=OBJ`` with fixed variables.

    :param source: the unpacked source
    :param obj: the object folder (created)
    :param log: the build's log
    :param variables: ``NAME=value`` arguments every make call gets (``CC=gcc-12``, ...)
    """

    def __init__(self, source: SourceTree, obj: Path, log: BuildLog,
                 variables: Sequence[str] = ()) -> None:
        self.source = source
        self.obj = obj
        self.log = log
        self.variables = list(variables)
        obj.mkdir(parents=True, exist_ok=True)

    def make(self, *targets: str, phase: str, timeout: float, variables: Sequence[str] = ()) -> None:
        """Run make for ``targets`` in this tree (all CPUs).

        :raise KernelBuildError: when it fails or times out
        """
        self.log.run(
            ["make", "-C", str(self.source.root), f"O={self.obj}", f"-j{jobs()}",
             *self.variables, *variables, *targets],
            phase=phase, timeout=timeout, env=BUILD_ENV)

    @property
    def config_path(self) -> Path:
        return self.obj / ".config"

    def configure(self, fragments: Sequence[Fragment], *, base: Path | None = None,
                  base_target: str | None = None) -> dict[str, str]:
        """Configure from a base and ``fragments``, then check every fragment option.

        Two ways: ``base`` (a ``.config`` file): the fragments are appended to it and
        ``make olddefconfig`` settles the rest (new options get their defaults);
        ``base_target`` (``allnoconfig``): ``make KCONFIG_ALLCONFIG=<fragments> allnoconfig``,
        so every option the fragments do not set or select is off.

        :return: the resulting configuration
        :raise KernelConfigError: when an option of a fragment did not survive
        :raise KernelBuildError: when make fails
        """
        if (base is None) == (base_target is None):
            raise ValueError("configure needs exactly one of base and base_target")
        merged = "".join(f"# --- {f.path.name} ---\n{f.text()}" for f in fragments)
        if base is not None:
            self.config_path.write_text(base.read_text() + merged)
            self.make("olddefconfig", phase="make olddefconfig", timeout=CONFIG_TIMEOUT)
        else:
            forced = self.obj / "fragments.config"
            forced.write_text(merged)
            self.make(str(base_target), phase=f"make {base_target}", timeout=CONFIG_TIMEOUT,
                      variables=[f"KCONFIG_ALLCONFIG={forced}"])
        text = self.config_path.read_text()
        result = parse_config(text)
        problems = unmet(list(fragments), result)
        if problems:
            self.log.note(f"resulting .config:\n{text}")
            names = [problem.split("=", 1)[0] for problem in problems]
            raise KernelConfigError(problems, kconfig_dependencies(self.source.root, names),
                                    self.log.path)
        return result
