"""``python -m t2t_fast ...`` (and ``torchrun -m t2t_fast train ...``): the ``t2t-fast`` command."""
import sys

from t2t_fast.cli import main

sys.exit(main())
