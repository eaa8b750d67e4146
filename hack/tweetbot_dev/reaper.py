"""python -m tweetbot_dev.reaper OWNER_PID HOME: tear down the dev environment in HOME once OWNER_PID exits.

Test sessions start one, so an interrupted or killed run leaves no etcd, apiserver or MinIO behind.
"""

import sys
import time
from pathlib import Path

from .devenv import DevEnvironment
from .processes import is_running


def main(owner_pid: int, home: Path) -> None:
    while is_running(owner_pid) and home.exists():
        time.sleep(0.5)
    env = DevEnvironment.load(home)
    if env is not None:
        env.down()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
