import sys

from tuneloop_trainer.main import main

sys.exit(main())
