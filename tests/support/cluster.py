"""Controller-side handles on a deployed lab for the drills and benchmarks.

Everything about the cluster is read from what the deployment actually wrote: the Celery
settings come from /etc/celery-ha/celery.env on a worker host, turned into Celery settings by
the same ``celery_ha_settings.load`` the workers use. The drills therefore publish with the
production settings (Sentinel discovery, publish retry policy) and break if the deployment's
wiring breaks, instead of testing a copy of it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import celery_ha_settings
import redis
from celery import Celery
from celery_ha_exec import parse_env
from redis.sentinel import Sentinel

from support.inventory import read_inventory
from support.labflavor import lab_flavor
from support.labtls import tls_env, tls_kwargs
from support.ledger import DEFAULT_LEDGER_DIR, RECORD_TASK, Ledger

REPO = Path(__file__).resolve().parents[2]

CELERY_ENV = "/etc/celery-ha/celery.env"


class Lab:
    """Thin wrapper over tests/lab/lab with the caller's LAB_* environment."""

    def __init__(self, lab_dir: str | None = None, inventory: Path | None = None) -> None:
        self.lab_dir = Path(lab_dir or os.environ.get("LAB_DIR") or REPO / ".lab")
        self.script = REPO / "tests" / "lab" / "lab"
        # Another inventory of the same lab's hosts (a drill that changes the cluster's
        # membership writes its own); the lab's generated one by default.
        self.inventory = inventory or self.lab_dir / "inventory.ini"
        self.env = dict(os.environ, LAB_DIR=str(self.lab_dir))
        if "LAB_NET" not in os.environ and self.exists():
            # The lab script finds hosts by LAB_NET; a caller that only set LAB_DIR must not
            # end up talking to another lab on the default subnet.
            first = next(iter(self.addresses().values()), None)
            if first:
                self.env["LAB_NET"] = first.rsplit(".", 1)[0]

    def exists(self) -> bool:
        return self.inventory.is_file()

    def group(self, name: str) -> list[str]:
        return read_inventory(self.inventory)[0].get(name, [])

    def addresses(self) -> dict[str, str]:
        return read_inventory(self.inventory)[1]

    def host_of(self, address: str) -> str:
        for host, addr in self.addresses().items():
            if addr == address:
                return host
        raise KeyError(f"no lab host has address {address}")

    def run(
        self, *args: str, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.script), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def ssh(self, host: str, command: str, timeout: float = 30, check: bool = True) -> str:
        proc = self.run("ssh", host, command, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{host}: `{command}` exited {proc.returncode}: {proc.stderr.strip()[-400:]}"
            )
        return proc.stdout

    def playbook_env(self) -> dict[str, str]:
        """The environment ansible-playbook runs in against this lab: the repository's
        ansible.cfg, no colour, and this venv's tools first on PATH."""
        env = dict(self.env, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0")
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    def ansible_playbook(
        self, *extra: str, timeout: float = 900, name: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """site.yml (or ``name``, a playbook under ansible/) on the lab, with extra arguments;
        never raises on its exit code."""
        return subprocess.run(
            [
                str(Path(sys.executable).parent / "ansible-playbook"),
                "-i",
                str(self.inventory),
                str(REPO / "ansible" / name)
                if name
                else os.environ.get("DRILLS_PLAYBOOK") or str(REPO / "ansible" / "site.yml"),
                *extra,
            ],
            cwd=REPO,
            env=self.playbook_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def playbook(
        self, *extra: str, timeout: float = 900, name: str | None = None
    ) -> tuple[int, dict[str, dict[str, int]], str]:
        """ansible_playbook(); return (rc, recap per host, tail of output)."""
        proc = self.ansible_playbook(*extra, timeout=timeout, name=name)
        return proc.returncode, parse_recap(proc.stdout), proc.stdout[-3000:] + proc.stderr[-2000:]


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap: dict[str, dict[str, int]] = {}
    in_recap = False
    for line in output.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        if in_recap:
            m = re.match(r"^(\S+)\s*:\s*(.*)$", line)
            if not m:
                continue
            counts = dict(re.findall(r"(\w+)=(\d+)", m.group(2)))
            if counts:
                recap[m.group(1)] = {k: int(v) for k, v in counts.items()}
    return recap


def recap_total(recap: dict[str, dict[str, int]], key: str) -> int:
    """One of the recap's counts (changed, ok, skipped...) summed over its hosts."""
    return sum(counts.get(key, 0) for counts in recap.values())


def changed_tasks(output: str, host: str) -> list[str]:
    """Names of the tasks and handlers that reported changed for `host` in a playbook's output."""
    names = []
    for block in re.split(r"^(?=TASK \[|RUNNING HANDLER \[)", output, flags=re.M):
        header = re.match(r"(?:TASK|RUNNING HANDLER) \[(.+?)\]", block)
        if header and re.search(rf"^changed: \[{host}\]", block, re.M):
            names.append(header.group(1))
    return names


class Cluster:
    """The deployed cluster as a client sees it, plus the lab hosts behind it."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.addresses = lab.addresses()
        self.worker_hosts = lab.group("celery_workers")
        self.redis_hosts = lab.group("redis")
        self.sentinel_hosts = lab.group("sentinel")
        # Redis or Valkey: the units the drills stop, kill and read the journal of.
        self.flavor = lab_flavor(lab.lab_dir)
        # The hosts' certificate paths mean nothing here: the controller is the operator.
        self.env = self._read_env() | tls_env(lab.lab_dir / "secrets")
        self.tls = tls_kwargs(lab.lab_dir / "secrets")
        self.settings = celery_ha_settings.load(self.env)
        self.master_name: str = self.env["CELERY_HA_MASTER_NAME"]
        self.sentinels = celery_ha_settings.parse_sentinels(self.env["CELERY_HA_SENTINELS"])
        self.broker_db = int(self.env.get("CELERY_HA_BROKER_DB") or 0)
        self.result_db = int(self.env.get("CELERY_HA_RESULT_DB") or 1)
        self.username = self.env.get("CELERY_HA_REDIS_USERNAME") or None
        self.password = self.env.get("CELERY_HA_REDIS_PASSWORD") or None
        self.sentinel_kwargs = dict(self.settings["broker_transport_options"]["sentinel_kwargs"])
        self.ledger_dir = self.env.get("CELERY_HA_DRILL_LEDGER_DIR") or DEFAULT_LEDGER_DIR
        self.default_queue = self.settings.get("task_default_queue", "default")
        self._app: Celery | None = None
        self._last_host_text: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    # -- configuration -------------------------------------------------------------------
    def reload(self) -> None:
        """Read the deployment's settings again, as a restarted client would: after
        ansible/rotate_secrets.yml moved celery.env to new passwords."""
        self.__init__(self.lab)  # type: ignore[misc]

    def _read_env(self) -> dict[str, str]:
        errors = []
        for host in self.worker_hosts:
            try:
                return parse_env(
                    self.lab.ssh(host, f"cat {CELERY_ENV}", timeout=20), f"{host}:{CELERY_ENV}"
                )
            except Exception as exc:
                errors.append(f"{host}: {exc}")
        raise RuntimeError(f"cannot read {CELERY_ENV} from any worker host: {errors}")

    @property
    def app(self) -> Celery:
        """A client-only Celery app with the deployment's own settings (never a worker)."""
        if self._app is None:
            app = Celery("celery-ha-drills", set_as_current=False)
            app.conf.update(self.settings)
            self._app = app
        return self._app

    def admin_password(self) -> str | None:
        path = self.lab.lab_dir / "secrets" / "redis_admin_password"
        return path.read_text().split()[0] if path.is_file() else None

    # -- Sentinel and Redis --------------------------------------------------------------
    def sentinel(self, exclude: Iterable[str] = ()) -> Sentinel:
        excluded = {self.addresses.get(h, h) for h in exclude}
        nodes = [(h, p) for h, p in self.sentinels if h not in excluded]
        return Sentinel(
            nodes,
            sentinel_kwargs=self.sentinel_kwargs,
            username=self.username,
            password=self.password,
            socket_timeout=3,
            socket_connect_timeout=3,
            **self.tls,
        )

    def sentinel_client(self, host: str) -> redis.Redis:
        """A direct connection to host's Sentinel (the caller closes it)."""
        port = dict(self.sentinels).get(self.addresses[host], 26379)
        return redis.Redis(
            host=self.addresses[host],
            port=port,
            socket_timeout=2,
            socket_connect_timeout=2,
            **{k: v for k, v in self.sentinel_kwargs.items() if k in ("username", "password")},
            **self.tls,
        )

    def sentinel_views(self, hosts: Iterable[str] | None = None) -> dict[str, str | None]:
        """Which address each reachable Sentinel names as master (None = no answer)."""
        views: dict[str, str | None] = {}
        for host in hosts or self.sentinel_hosts:
            client = self.sentinel_client(host)
            try:
                addr = client.execute_command(
                    "SENTINEL", "get-master-addr-by-name", self.master_name
                )
                views[host] = addr[0].decode() if addr else None
            except redis.RedisError:
                views[host] = None
            finally:
                client.close()
        return views

    def master_host(self, exclude: Iterable[str] = ()) -> str:
        """The master named by a majority of the reachable Sentinels (raises if none)."""
        views = self.sentinel_views([h for h in self.sentinel_hosts if h not in set(exclude)])
        answers = [v for v in views.values() if v]
        if not answers:
            raise RuntimeError(f"no Sentinel answered: {views}")
        best = max(set(answers), key=answers.count)
        return self.lab.host_of(best)

    def redis_on(self, host: str, db: int | None = None, admin: bool = False) -> redis.Redis:
        port = int(self.env.get("CELERY_HA_REDIS_PORT") or 6379)
        user, password = (self.username, self.password)
        if admin:
            user, password = "admin", self.admin_password()
        return redis.Redis(
            host=self.addresses[host],
            port=port,
            db=self.broker_db if db is None else db,
            username=user,
            password=password,
            socket_timeout=3,
            socket_connect_timeout=3,
            **self.tls,
        )

    def role_of(self, host: str) -> str | None:
        """ROLE of host's Redis via the admin user (the celery user may not run ROLE)."""
        client = self.redis_on(host, admin=True)
        try:
            role = client.execute_command("ROLE")
            name = role[0].decode() if isinstance(role[0], bytes) else role[0]
            if name == "slave" and len(role) > 3:
                state = role[3].decode() if isinstance(role[3], bytes) else role[3]
                return f"replica:{state}"
            return name
        except redis.RedisError:
            return None
        finally:
            client.close()

    def write_probe(self, host: str) -> str:
        """Try a write as the celery user on host's Redis; 'ok' or the error text."""
        client = self.redis_on(host)
        try:
            client.set("drills:write-probe", str(time.time()), ex=60)
            return "ok"
        except redis.RedisError as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            client.close()

    def host_init_pid(self, host: str) -> int:
        """PID 1 of a lab host, seen from the controller (same cgroup path as tests/lab/lab)."""
        _, octet2, octet3, _ = self.addresses[host].split(".")
        # The same tag as tests/lab/lab derives (10.88.x keeps its older, shorter form).
        tag = os.environ.get("LAB_TAG") or ("cha" + (octet3 if octet2 == "88" else octet2 + octet3))
        procs = Path(f"/sys/fs/cgroup/systemd/{tag}-lab/{host}/payload/init.scope/cgroup.procs")
        return int(procs.read_text().split()[0])

    def write_probe_in_netns(self, host: str) -> str:
        """write_probe from inside host's network namespace, to loopback.

        For a partitioned host: nothing outside can reach it, but what its own clients
        (its workers) get from its Redis is exactly what matters.
        """
        code = (
            "import json, os, redis\n"
            "c = redis.Redis(host='127.0.0.1', port=int(os.environ['P']), "
            "db=int(os.environ['D']), username=os.environ.get('U') or None, "
            "password=os.environ.get('W') or None, socket_timeout=3, socket_connect_timeout=3, "
            "**json.loads(os.environ['K']))\n"
            "try:\n"
            "    c.set('drills:write-probe', '1', ex=60); print('ok')\n"
            "except redis.RedisError as e:\n"
            "    print(type(e).__name__ + ': ' + str(e))\n"
        )
        env = dict(
            os.environ,
            P=str(int(self.env.get("CELERY_HA_REDIS_PORT") or 6379)),
            D=str(self.broker_db),
            U=self.username or "",
            W=self.password or "",
            K=json.dumps(self.tls),
        )
        pid = self.host_init_pid(host)
        proc = subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return (proc.stdout.strip() or proc.stderr.strip()[-300:]) or "no answer"

    def master_client(self, db: int) -> redis.Redis:
        return self.sentinel().master_for(self.master_name, db=db, socket_timeout=5)

    def queue_length(self, queue: str | None = None) -> int:
        client = self.master_client(self.broker_db)
        return int(client.llen(queue or self.default_queue))

    def parked_ids(self) -> dict[str, str]:
        """Task ids sitting in kombu's unacked hash (redelivered after visibility_timeout)."""
        client = self.master_client(self.broker_db)
        out: dict[str, str] = {}
        for tag, raw in client.hgetall("unacked").items():
            try:
                message = json.loads(raw)[0]
                task_id = (
                    message.get("headers", {}).get("id") or message["properties"]["correlation_id"]
                )
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            out[task_id] = tag.decode() if isinstance(tag, bytes) else str(tag)
        return out

    def result_states(self, task_ids: Iterable[str]) -> dict[str, str]:
        client = self.master_client(self.result_db)
        ids = list(task_ids)
        states: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            pipe = client.pipeline(transaction=False)
            for task_id in chunk:
                pipe.get(f"celery-task-meta-{task_id}")
            for task_id, raw in zip(chunk, pipe.execute(), strict=True):
                if raw:
                    try:
                        states[task_id] = json.loads(raw).get("status", "?")
                    except ValueError:
                        states[task_id] = "?"
        return states

    # -- tasks ---------------------------------------------------------------------------
    def sender(self, ledger: Ledger, sleep_s: float = 0.0, queue: str | None = None):
        app = self.app

        def send(ledger_id: str) -> None:
            app.send_task(
                RECORD_TASK,
                args=(ledger_id, ledger.run_id, sleep_s),
                task_id=ledger_id,
                queue=queue,
            )

        return send

    def ledger_text(self, host: str, run_id: str) -> str | None:
        """The ledger file of run_id on host, or None when the host cannot be read now."""
        path = f"{self.ledger_dir}/{shlex.quote(run_id)}.log"
        try:
            return self.lab.ssh(host, f"cat {path} 2>/dev/null || true", timeout=15)
        except Exception:
            return None

    def collect(self, ledger: Ledger, hosts: Iterable[str] | None = None) -> None:
        hosts = list(hosts or self.worker_hosts)
        with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            for host, text in zip(
                hosts, pool.map(lambda h: self.ledger_text(h, ledger.run_id), hosts), strict=True
            ):
                if text is not None:
                    ledger.set_host_lines(host, text)

    def wait_drained(
        self,
        ledger: Ledger,
        timeout: float = 180,
        parked_ok: bool = True,
        settle_s: float | None = None,
    ) -> set[str]:
        """Poll until every published id ran (or sits parked in unacked). Returns parked ids.

        With settle_s, also stop once no id has run for settle_s seconds while the queue is
        empty and none of the pending ids is in unacked: those ids are nowhere in the broker,
        so they are lost, not late (a producer without the publish acknowledgement expects
        some), and waiting out the timeout would prove nothing more.
        Never raises on timeout: the caller reports what is still missing as lost.
        """
        deadline = time.monotonic() + timeout
        parked: set[str] = set()
        last_pending, last_progress = -1, time.monotonic()
        while True:
            self.collect(ledger)
            pending = ledger.pending()
            if not pending:
                return set()
            if len(pending) != last_pending:
                last_pending, last_progress = len(pending), time.monotonic()
            if parked_ok or settle_s is not None:
                try:
                    held = set(self.parked_ids()) & pending
                except redis.RedisError:
                    held = None
                if parked_ok:
                    parked = held or set()
                settled = settle_s is not None and time.monotonic() - last_progress >= settle_s
                nothing_else_comes = held is not None and (
                    (parked_ok and pending <= held) or (settled and not held)
                )
                if nothing_else_comes and self._queue_empty():
                    return parked
            if time.monotonic() >= deadline:
                return parked
            time.sleep(2)

    def _queue_empty(self) -> bool:
        try:
            return self.queue_length() == 0
        except redis.RedisError:
            return False

    def failed_count(self, ledger: Ledger) -> int:
        states = self.result_states(list(ledger.published))
        return sum(1 for s in states.values() if s == "FAILURE")

    def ping_workers(self, timeout: float = 3.0) -> list[str]:
        replies = self.app.control.ping(timeout=timeout)
        return sorted(name for reply in replies for name in reply)
