import sys

try:
    from tuneloop_trainer.main import main
except KeyboardInterrupt:  # Ctrl-C while Python imports the trainer: nothing is written yet
    print("stopped on SIGINT before training started", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
