"""`python -m ddplaunch` is the same as the `ddplaunch` command.

Except as a head's node agent (`--agent` first, as ddplaunch.fanout.agent_argv writes it): the
host may have nothing but Python, so the agent's flags are read by ddplaunch.agent_cli with the
standard library, and cli.py (click) is never imported. Only the first word decides: an
`--agent` among a script's own arguments is the script's.
"""

import sys

if sys.argv[1:2] == ["--agent"]:
    from ddplaunch.agent_cli import main as agent_main

    agent_main()
else:
    from ddplaunch.cli import main

    main()
