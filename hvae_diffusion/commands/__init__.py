"""The command-line programs (``hvae-train``, ``hvae-sample``, ...): each module parses arguments and calls the
library; ``scripts/*.py`` and the console entry points both run a module's ``main``."""
