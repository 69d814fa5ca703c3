"""Print the version and location of each module named on the command line (a GPU call's
env.txt), or why it does not import.

    python benchmarks/versions.py torch transformers peft petkit
"""

import importlib
import sys

for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as err:  # a broken install is what this report is for
        print(name, "IMPORT FAILED:", type(err).__name__, err)
