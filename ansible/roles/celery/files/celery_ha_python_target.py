# celery-ha: which Python a wheelhouse is for. Run with python3 on each host (tasks/install.yml,
# as `python3 -c PROGRAM`) and with celery_controller_python on the controller; standard
# library only. Prints one JSON object: the interpreter, its version to the patch level, its
# ABI flags, the machine and the C library, all a wheel's tags and a dependency's markers
# can depend on on Linux.
import json
import platform
import sys
import sysconfig

libc, libc_version = platform.libc_ver()
print(
    json.dumps(
        {
            "implementation": sys.implementation.name,
            "version": platform.python_version(),
            "abiflags": getattr(sys, "abiflags", ""),
            "machine": platform.machine(),
            "libc": f"{libc}-{libc_version}" if libc else "",
            "platform": sysconfig.get_platform(),
        },
        sort_keys=True,
    )
)
