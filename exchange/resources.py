"""Where the files outside the ``exchange`` package that its commands need are: ``alembic/`` (``exchange
migrate``), ``gunicorn.conf.py`` (``exchange api``), ``ops/`` (``exchange dev``'s pgbouncer script, ``exchange
bench``).

Two layouts, one rule. In the source tree (a checkout, an editable install, the image's ``/app``) they sit beside
the package, at the repository's top level (DESIGN.md §8). The wheel carries ``ops`` as a package of its own, beside
``exchange`` in site-packages as in the tree, but cannot put ``alembic/`` there (it would replace the alembic
library) nor a loose ``gunicorn.conf.py``: those two travel inside the package, under ``exchange/_bundled/``
(pyproject.toml's ``force-include``). Invariant: :func:`top_level` names the copy of this very version, bundled
when the package has one, else the one beside the package. (An editable install, ``uv sync``, also copies the
bundled files into site-packages, but its ``exchange`` package is the source tree's, which has no ``_bundled/``:
that copy is never read, so a new migration needs no reinstall.)
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent
"""The directory holding the ``exchange`` package: the repository, or site-packages when installed from the wheel."""
BUNDLED_DIR = PACKAGE_DIR / "_bundled"
"""The repository's top-level files the wheel carries inside the package; absent from the source tree."""


def top_level(name: str) -> Path:
    """The file or directory ``name`` of the repository's top level (``"alembic"``, ``"gunicorn.conf.py"``,
    ``"ops/scripts/pgbouncer.sh"``), wherever this installation keeps it."""
    bundled = BUNDLED_DIR / name
    return bundled if bundled.exists() else SOURCE_ROOT / name


def in_source_tree() -> bool:
    """True when the package runs from the repository (its ``pyproject.toml`` beside it), not from an install."""
    return (SOURCE_ROOT / "pyproject.toml").is_file()
