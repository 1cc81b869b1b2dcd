"""roi-seg-featcache's import root: ``roiseg.featcache`` (the data layer), ``roiseg.trainer``
(training, scoring, inference), ``roiseg.cli`` and ``roiseg.demo``.

In a source checkout the folders stay where the design puts them, at the repository root, and
this folder links to them (``roiseg/featcache -> ../featcache`` ...); an installed wheel holds them
here (``pyproject.toml``).  Either way the code imports ``roiseg.*`` only, so installing never puts
a generic top-level name such as ``trainer`` into site-packages.
"""

__version__ = "0.1.0"
