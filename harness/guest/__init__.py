"""Harness programs that run inside the lab's root cell.

Standard library only (plus the guest's :mod:`harness.hvmodel`): the root cell has
Debian's python3 and nothing installed. The guest payload
(:func:`harness.images.build_payload`) carries this package to
``/opt/jhlab/lib/harness/guest``; the host runs a program here with
``PYTHONPATH=/opt/jhlab/lib python3 -m harness.guest.NAME``.
"""
