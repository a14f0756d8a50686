"""The IPython front end, one module per topic (as IPython's ``core/magics/``)."""

from .batch import BatchMagics
from .diff import DiffMagics
from .inventory import InventoryMagics
from .run import (
    POD_MAGICS,
    CldpdMagics,
    load_ipython_extension,
    shown_result,
    split_prompt,
    unload_ipython_extension,
)
from .support import (
    ArgumentScan,
    MagicsCore,
    is_docker_error,
    parse_args,
    parse_verbatim,
    positional_names,
    scan_arguments,
    unquote,
    user_errors,
)

__all__ = [
    "POD_MAGICS",
    "ArgumentScan",
    "BatchMagics",
    "CldpdMagics",
    "DiffMagics",
    "InventoryMagics",
    "MagicsCore",
    "is_docker_error",
    "load_ipython_extension",
    "parse_args",
    "parse_verbatim",
    "positional_names",
    "scan_arguments",
    "shown_result",
    "split_prompt",
    "unload_ipython_extension",
    "unquote",
    "user_errors",
]
