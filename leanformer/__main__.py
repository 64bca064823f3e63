import sys

from leanformer.cli import main

sys.exit(main())
