"""
The main command: the paper's comparison end to end on the default domain (or on --data),
from teacher SFT to the report. The comparison itself lives in the lab (lab/reproduce.py);
this file only starts it, so that it stays one short command from the repository root.

    python reproduce.py                 # one seed, about 10 minutes on a 2-core CPU
    python reproduce.py --help          # every flag
"""
from lab.reproduce import cli

if __name__ == "__main__":
    cli()
