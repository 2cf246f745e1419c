"""sparsemeta: lottery tickets in meta-learned models."""

__version__ = "0.1.0"

#: modules that add config sections when imported (``config.add_section``): the sparsity
#: methods' settings. The config layer sits below them, so it imports them by these names when a
#: config is first built — the one place where the package wires an upper layer into a lower one.
SECTION_PROVIDERS = ("sparsemeta.experiments.methods",)
