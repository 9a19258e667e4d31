"""What an operator installs and runs: the wheel in a fresh environment outside the source tree, a whole
recovery through its HTTP routes and CLI, and the Prometheus rules and Grafana dashboard under deploy/.

The fresh environment gets the wheel and, beside it, exactly the distributions the wheel declares
(followed through their own requirements): nothing else from this environment, and not the source tree.
A static check adds that every module the wheel imports is declared directly, not merely pulled in by
another package.
"""
from __future__ import annotations

import ast
import email
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pyotp
import pytest
import requests
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ChatClient, code_in, free_port, link_in
from tests.helpers import wait_until_answers

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMTOOL = "/usr/bin/promtool"
OWN = {"bot", "recovery"}


# ---- the wheel, installed on its own -----------------------------------------------------------------

def _build_wheel(tmp: Path) -> Path:
    """Build from a copy of the files git knows (tracked or new, not ignored), so the wheel can only
    contain what a clean checkout has."""
    src = tmp / "src"
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True)
    return next((tmp / "dist").glob("recoverybot-*.whl"))


def _declared(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = email.message_from_bytes(z.read(meta))
    return [r for r in map(Requirement, headers.get_all("Requires-Dist") or [])
            if r.marker is None or r.marker.evaluate({"extra": ""})]


def _closure(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions that `requirements` need, following each one's own requirements."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(r, frozenset(r.extras)) for r in requirements]
    while todo:
        req, extras = todo.pop()
        dist = metadata.distribution(req.name)
        key = canonicalize_name(dist.metadata["Name"])
        if key in found and not extras:
            continue
        found[key] = dist
        for raw in dist.requires or []:
            sub = Requirement(raw)
            wanted = sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ({""} | extras))
            if wanted:
                todo.append((sub, frozenset(sub.extras)))
    return found


def _link_dependencies(dists, target: Path) -> None:
    """Symlink each distribution's top-level files (packages, modules, .dist-info) into `target`."""
    target.mkdir()
    for dist in dists.values():
        for entry in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(entry))
            if entry != "__pycache__" and source.exists() and not (target / entry).exists():
                (target / entry).symlink_to(source)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, wheel): the wheel installed into a fresh virtual environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    _link_dependencies(_closure(_declared(wheel)), tmp / "deps")
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "recoverybot-deps.pth").write_text(f"{tmp / 'deps'}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    return venv / "bin", wheel


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLACK_", "INTERCOM_", "DATABASE_URL", "SMTP_", "PYTHON", "VIRTUAL_ENV"))}
    return env | extra


def _wait_for_mail(folder: Path, template: str, count: int = 1, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(f"*-{template}.eml"))
        if len(found) >= count:
            return email.message_from_bytes(found[count - 1].read_bytes(), policy=email.policy.default)
        time.sleep(0.1)
    raise AssertionError(f"no {template} email in {folder}")


@pytest.fixture(scope="module")
def recovered(installed, tmp_path_factory):
    """`recoverybot serve` from the wheel, with one customer taken from "I lost my authenticator" to a
    new authenticator, a wrong code and a refused approval on the way; yields (base url, case id, bin)."""
    bin_dir, _ = installed
    home = tmp_path_factory.mktemp("operator")
    port = free_port()
    env = _clean_env(PORT=str(port), LOG_FORMAT="json")
    proc = subprocess.Popen([str(bin_dir / "recoverybot"), "serve"], cwd=home, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{base}/readyz", timeout=60, process=proc, output=proc.stdout.read, interval=0.2)
        mail = home / "var" / "mail"
        chat = ChatClient(base)
        assert "email address" in chat.ask("I lost my authenticator")
        assert "verification code" in chat.ask("alex@example.com")
        code = code_in(_wait_for_mail(mail, "verification_code"))
        chat.ask("000000" if code != "000000" else "111111")  # one wrong code first
        assert "first deposit" in chat.ask(code)
        assert "currency" in chat.ask("May 2023")
        case_id = re.search(r"RC-[A-Z0-9]{8}", chat.ask("USDT")).group(0)

        cli = [str(bin_dir / "recoverybot"), "cases", "approve", case_id, "--approver"]
        refused = subprocess.run(cli + ["mallory"], cwd=home, env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "refused" in refused.stderr
        subprocess.run(cli + ["alice"], cwd=home, env=env, capture_output=True, text=True, timeout=60, check=True)

        link = link_in(_wait_for_mail(mail, "enroll_link"), "enroll")
        browser = requests.Session()
        assert browser.get(link, timeout=10).status_code == 200
        setup = browser.post(link, data={"step": "start", "password": "correct horse battery"}, timeout=10)
        secret = re.search(r'id="setup-key">([A-Z2-7 ]+)<', setup.text).group(1).replace(" ", "")
        done = browser.post(link, data={"step": "confirm", "code": pyotp.TOTP(secret).now()}, timeout=10)
        assert done.status_code == 200 and 'id="recovery-codes"' in done.text
        yield base, case_id, bin_dir, home, env
    finally:
        proc.terminate()
        output = proc.communicate(timeout=15)[0]
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines and all("event" in line and "level" in line for line in lines)
    started = next(line["startup"] for line in lines if line["event"] == "Recovery Bot serve started")
    assert started["chat"] == f"{base}/chat" and started["accounts"] == "embedded directory"
    assert not [line for line in lines if line["logger"].startswith("alembic")], "Alembic's start-up chatter"


def test_the_wheel_runs_a_whole_recovery_outside_the_source_tree(installed, recovered):
    """The installed wheel's `recoverybot` serves, migrates and completes a recovery, importing its code
    and its templates from the fresh environment, not from the source tree."""
    bin_dir, _ = installed
    _, case_id, _, home, env = recovered
    where = subprocess.run([str(bin_dir / "python"), "-c", "import bot.templates, recovery.db; "
                            "print(bot.templates.BUILTIN); print(recovery.db.__file__)"],
                           cwd=home, env=env, capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where and str(bin_dir.parent) in where
    shown = subprocess.run([str(bin_dir / "recoverybot"), "cases", "show", case_id], cwd=home, env=env,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"case {case_id}: completed" in shown


def _imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_wheel_declares_every_module_it_imports(installed):
    """Every third-party module that any file in the wheel imports belongs to a distribution the wheel
    declares itself, so no runtime import rests on another package's dependencies."""
    _, wheel = installed
    with zipfile.ZipFile(wheel) as z:
        imported = set().union(*(_imports(z.read(n).decode()) for n in z.namelist() if n.endswith(".py")))
    declared = {canonicalize_name(r.name) for r in _declared(wheel)}
    owners = metadata.packages_distributions()
    third_party = sorted(imported - OWN - set(sys.stdlib_module_names))
    assert {"flask", "sqlalchemy", "httpx", "structlog"} <= set(third_party)
    undeclared = {m: owners.get(m) for m in third_party
                  if not {canonicalize_name(d) for d in owners.get(m, [])} & declared}
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"


# ---- Prometheus and Grafana ----------------------------------------------------------------------------

def _promtool(*args: str, cwd: Path = DEPLOY / "prometheus") -> str:
    if not os.path.exists(PROMTOOL):
        if os.environ.get("CI"):
            pytest.fail(f"{PROMTOOL} is missing; .ci/run installs Debian's prometheus package")
        pytest.skip(f"PROMTOOL TESTS SKIPPED: {PROMTOOL} is missing (apt-get install prometheus)")
    out = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_promtool_accepts_the_rules_their_unit_tests_and_the_scrape_config(tmp_path):
    """`promtool check rules` accepts the alerting rules, `promtool test rules` fires each alert on the
    series meant to fire it, and `promtool check config` accepts the example configuration."""
    assert "SUCCESS: 9 rules found" in _promtool("check", "rules", "recoverybot-alerts.yml")
    assert "SUCCESS" in _promtool("test", "rules", "recoverybot-alerts.test.yml")
    shutil.copy(DEPLOY / "prometheus" / "recoverybot-alerts.yml", tmp_path)
    token = tmp_path / "token"
    token.write_text("example")
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/recoverybot-metrics-token", str(token)))
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml", cwd=tmp_path)


METRIC = re.compile(r"\brecoverybot_[a-z_]+")


def _named_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "recoverybot-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = (DEPLOY / "prometheus" / "recoverybot-alerts.yml").read_text()
    return set(METRIC.findall("\n".join(exprs))) | set(METRIC.findall(rules))


def test_every_metric_the_dashboard_and_rules_name_is_served(recovered):
    """After the scripted recovery, /metrics has samples for every metric that the Grafana dashboard
    and the alerting rules query."""
    base = recovered[0]
    wanted = _named_metrics()
    assert len(wanted) >= 20
    deadline, missing = time.monotonic() + 20, wanted
    while missing and time.monotonic() < deadline:  # the database's numbers refresh every few seconds
        text = requests.get(f"{base}/metrics", timeout=10).text
        served = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
        missing = wanted - served
        time.sleep(0.5)
    assert not missing, f"named by deploy/ but not served: {sorted(missing)}"
    completed = 'recoverybot_case_transitions_total{event="complete",from_state="link_sent",to_state="completed"} 1.0'
    assert completed in text
    assert 'recoverybot_verification_failures_total{reason="email_code_wrong"} 1.0' in text
    assert 'recoverybot_approval_refusals_total{reason="not_authorized"} 1.0' in text
