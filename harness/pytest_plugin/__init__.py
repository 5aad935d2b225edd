"""pytest plugin of jhlab (entry point ``pytest11``).

Options (group ``jhlab``): ``--lab`` (built-in name or lab file), ``--accel``,
``--lab-log-dir`` (where each lab run and each failed test's artefacts go), ``--lab-attach
NAME`` (use the running lab NAME, ``jhlab up NAME``, instead of booting one: it is not
reset after a failure and stays up at the end), ``--keep-lab``
(leave the session lab running at the end: pytest prints how to reach it and waits,
because QEMU dies with the process that started it; Ctrl-C or ``jhlab down`` ends it),
``--hv-arch`` (what the guest's hypervisor daemon runs cells on for tests that do not
need KVM: ``oracle``, the default, or ``executor``), ``--lab-progress`` (a bar per suite
and what each lab does: :mod:`~harness.pytest_plugin.progress`), ``--lab-report FILE``
and ``--lab-report-bench FILE|DIR`` (the HTML report of the run:
:mod:`~harness.pytest_plugin.reporting`).

Labs in parallel (pytest-xdist, ``-n N``): each worker boots its own session lab, under
a name of its own (``default-gw0``, ``default-gw1``; ``default-pytest`` without xdist:
:mod:`harness.activity`), so run directories, log folders, ssh ports and QEMU names never
clash; the workers log under their controller's folder. The plugin's labs are listed with
the labs that are up (``jhlab status`` shows what each is doing; ``jhlab shell NAME``
reaches one while its test runs).

Fixtures (each builds on the one before):

* ``lab`` (session): one booted lab shared by the whole session; a reset point is saved
  right after boot, and the lab is put back to it (``Lab.reset``, ~1 s with the reconnection) after every
  test that failed or is marked ``dirty`` (also at run time:
  ``request.node.add_marker("dirty")``). The session's JUnit report gets the lab's
  name, accelerator, kernel and QEMU version as properties.
* ``lab_factory`` (function): boots extra labs for tests that break theirs (panics,
  killed QEMU); every lab it made is stopped at teardown.
* ``root_shell``: commands and files in the lab's root cell (:class:`RootShell`).
* ``inmates`` (session): jhlab's demo inmates, built once (``DIR/<demo>.bin``).
* ``jailhouse_arch``: ``executor`` for tests marked ``kvm``, else ``--hv-arch``.
* ``jailhouse_test_device``: whether the guest's hypervisor and the oracle have
  ``CONFIG_TEST_DEVICE`` (False; a test sets it with
  ``@pytest.mark.parametrize("jailhouse_test_device", [True])``).
* ``jailhouse``: a :class:`~harness.checked.CheckedJailhouse` on the session lab (every
  step compared with the oracle); at teardown the cells left are destroyed and the
  hypervisor disabled, or, after a failure, the lab is reset.
* ``cell_factory``: creates (and loads, starts) cells through ``jailhouse`` and destroys
  the ones still there at teardown.
* ``oracle``: the ``jailhouse`` fixture's host-side :class:`~harness.checked.Oracle`.

Markers: ``lab`` (boots a real VM; ``lab("name")``: needs that lab, skipped on another),
``kvm`` (needs KVM inside the lab: skipped when the lab shows none; its cells run on the
executor), ``dirty`` (the test changes the lab: reset afterwards), ``slow``.
When a test that used a lab fails, its report gets the tails of both serial consoles
and the QMP event log, and the files are copied to ``<lab-log-dir>/failed/<test>/``.

Modules: :mod:`~harness.pytest_plugin.hooks` (options, markers, collection, failure
reports, ``--keep-lab``, handing xdist workers the session), :mod:`~harness.pytest_plugin.fixtures`
(the fixtures and the objects they give), :mod:`~harness.pytest_plugin.common` (what both
share: stash keys, the log folder, the session and worker, making labs under names of
their own), :mod:`~harness.pytest_plugin.progress`, :mod:`~harness.pytest_plugin.reporting`.
The entry point is this package, which pytest scans for
the hooks and fixtures it re-exports.
"""

from harness.pytest_plugin.fixtures import (
    CellFactory,
    RootShell,
    _track_lab_use,
    cell_factory,
    inmates,
    jailhouse,
    jailhouse_arch,
    jailhouse_test_device,
    lab,
    lab_factory,
    oracle,
    root_shell,
)
from harness.pytest_plugin.hooks import (
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_configure_node,
    pytest_load_initial_conftests,
    pytest_runtest_makereport,
    pytest_terminal_summary,
    pytest_unconfigure,
)

__all__ = [
    "CellFactory",
    "RootShell",
    "_track_lab_use",
    "cell_factory",
    "inmates",
    "jailhouse",
    "jailhouse_arch",
    "jailhouse_test_device",
    "lab",
    "lab_factory",
    "oracle",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_configure_node",
    "pytest_load_initial_conftests",
    "pytest_runtest_makereport",
    "pytest_terminal_summary",
    "pytest_unconfigure",
    "root_shell",
]
