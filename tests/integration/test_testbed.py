"""The multi-host test bed (issue 16 item 1): separate hosts, reached over SSH as ``tester``
with ``become``, through the collection installed from its built tarball.

Each test asserts an effect: a guest on hv1 is absent from hv2's ``guest_info``; a file
in hv1's /var/lib or /run is absent on hv2; hv1 reaches hv2's sshd over the private
network with host-key checking; a save and a restore through a playbook continue the
heartbeat; a fleet left behind by a run that never tore it down is reaped by the next
``up`` and ``down`` leaves nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from harness.paths import HARNESS_DIR
from harness.systemd_host import unavailable_reason
from harness.testbed import Fleet, TestbedConfig, installed_collection, leftovers

pytestmark = [pytest.mark.integration]

REASON = unavailable_reason()
if REASON:
    pytest.skip(f"no test bed: {REASON}", allow_module_level=True)

TESTS_DIR = HARNESS_DIR.parent

SAVE_PLAY = """
- hosts: "{{ target }}"
  gather_facts: false
  tasks:
    - name: The image directory
      ansible.builtin.file:
        path: /var/lib/qemu-saves
        state: directory
        mode: "0700"
    - name: Save the guest
      savestate.qemu.save:
        name: "{{ guest }}"
        path: "/var/lib/qemu-saves/{{ guest }}.sav"
"""

RESTORE_PLAY = """
- hosts: "{{ target }}"
  gather_facts: false
  tasks:
    - name: Restore the guest
      savestate.qemu.restore:
        path: "/var/lib/qemu-saves/{{ guest }}.sav"
        name: "{{ guest }}"
"""

FILES_PLAY = """
- hosts: hypervisors
  gather_facts: true
  tasks:
    - name: A marker on hv1 only
      ansible.builtin.copy:
        dest: "{{ item }}/testbed-marker"
        content: "{{ inventory_hostname }}\\n"
        mode: "0644"
      loop: [/var/lib, /run, /var/lib/qemu-guests]
      when: inventory_hostname == 'hv1'
    - name: Look for it
      ansible.builtin.stat:
        path: "{{ item }}/testbed-marker"
      loop: [/var/lib, /run, /var/lib/qemu-guests]
      register: marker
    - name: Report
      ansible.builtin.debug:
        msg: "{{ ansible_facts.hostname }} {{ ansible_facts.default_ipv4.address | default(ansible_facts.host0.ipv4.address) }}
          {{ marker.results | map(attribute='stat.exists') | list }} {{ ansible_facts.user_id }}"
"""


def test_the_collection_comes_from_its_tarball(testbed: Fleet) -> None:
    installed = installed_collection()
    assert installed.tarball.name.startswith("savestate-qemu-")
    assert (installed.path / "MANIFEST.json").is_file()
    env = testbed.ansible_env()
    assert env["ANSIBLE_COLLECTIONS_SCAN_SYS_PATH"] == "false" and env["ANSIBLE_COLLECTIONS_PATH"] in str(installed.path)


def test_a_guest_on_hv1_is_invisible_on_hv2(testbed: Fleet, testbed_guest) -> None:
    guest = testbed_guest("hv1", "tbiso1")
    on_hv1 = testbed.run_module("hv1", "guest_info", {"name": "tbiso1"})
    assert not on_hv1["failed"], on_hv1["_stdout"][-3000:]
    assert [g["name"] for g in on_hv1["guests"]] == ["tbiso1"]
    assert on_hv1["guests"][0]["pid"] in guest.pids()
    on_hv2 = testbed.run_module("hv2", "guest_info", {})
    assert not on_hv2["failed"], on_hv2["_stdout"][-3000:]
    assert "tbiso1" not in [g["name"] for g in on_hv2["guests"]]
    assert testbed["hv2"].ssh("pgrep -f guest=tbiso1,").stdout == ""
    # hv2's /proc is its own: its PID 1 is its systemd, and hv1's QEMU pid is not a QEMU there.
    pid = on_hv1["guests"][0]["pid"]
    assert "qemu" not in testbed["hv2"].ssh(f"cat /proc/{pid}/cmdline 2>/dev/null").stdout
    assert testbed["hv2"].sh("cat /proc/1/comm").strip() == "systemd"


def test_each_host_has_its_own_files_name_and_address(testbed: Fleet) -> None:
    run = testbed.run_playbook(FILES_PLAY).check()
    report = {r["_host"]: r["msg"].split() for r in run.results if "msg" in r}
    assert report["hv1"][:2] == ["hv1", testbed["hv1"].address], report
    assert report["hv2"][:2] == ["hv2", testbed["hv2"].address], report
    assert report["hv1"][2:5] == ["[True,", "True,", "True]"], report
    assert report["hv2"][2:5] == ["[False,", "False,", "False]"], report
    assert report["hv1"][5] == "root", report  # tester became root
    machine_ids = {h.sh("cat /etc/machine-id") for h in testbed}
    assert len(machine_ids) == len(testbed.hosts)


def test_hv1_reaches_hv2_over_ssh_on_the_private_network(testbed: Fleet, tmp_path: Path) -> None:
    """With the operator's agent forwarded, tester@hv1 logs into hv2 with host-key checking on."""
    socket = tmp_path / "agent.sock"
    agent = subprocess.run(["ssh-agent", "-a", str(socket), "-s"], capture_output=True, text=True, check=True).stdout
    agent_pid = int(agent.split("SSH_AGENT_PID=")[1].split(";")[0])
    env = {**os.environ, "SSH_AUTH_SOCK": str(socket)}
    try:
        subprocess.run(["ssh-add", "-q", str(testbed.config.key)], env=env, check=True, capture_output=True)
        hv1 = testbed["hv1"]
        remote = "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes hv2 hostname; " \
                 f"ssh -o BatchMode=yes {testbed['hv2'].address} 'hostname -I'"
        done = subprocess.run([*hv1.ssh_argv("tester")[:1], "-A", *hv1.ssh_argv("tester")[1:], remote],
                              env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["hv2", testbed["hv2"].address], done.stdout
    finally:
        os.kill(agent_pid, 15)
    # Without a key, hv2 refuses: the hosts do not trust each other by default.
    refused = hv1.ssh("ssh -o BatchMode=yes hv2 true", user="tester")
    assert refused.returncode != 0 and "Permission denied" in refused.stderr + refused.stdout


@pytest.mark.parametrize("qemu", ["10.0", "7.2"])
def test_save_and_restore_through_a_playbook_on_hv2(testbed: Fleet, testbed_guest, qemu: str) -> None:
    name = f"tbsave{qemu.replace('.', '')}"
    guest = testbed_guest("hv2", name, qemu=qemu)
    guest.wait_tick_above(3)
    run = testbed.run_playbook(SAVE_PLAY, {"target": "hv2", "guest": name}).check()
    assert any(r.get("changed") for r in run.host_results("hv2")), run.stdout[-3000:]
    saved_tick = guest.last_tick()
    assert guest.pids() == []
    assert testbed["hv2"].path(f"/var/lib/qemu-saves/{name}.sav").stat().st_size > 1 << 20
    assert not testbed["hv1"].path(f"/var/lib/qemu-saves/{name}.sav").exists()
    testbed.run_playbook(RESTORE_PLAY, {"target": "hv2", "guest": name}).check()
    guest.assert_continued(saved_tick)
    assert len(guest.pids()) == 1


def test_a_fleet_left_behind_is_reaped_and_down_leaves_nothing(tmp_path: Path) -> None:
    """A second fleet (own names and /24) driven through the CLI: `up` exits without tearing
    down, like a killed run; the next `up` reaps it; `down` leaves nothing."""
    config = TestbedConfig("svqx", "10.213.99", tmp_path / "fleet")
    cli = [sys.executable, "-m", "harness.testbed", "--name", config.name, "--subnet", config.subnet,
           "--dir", str(config.base_dir)]

    def run(*args: str) -> str:
        done = subprocess.run([*cli, *args], cwd=TESTS_DIR, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"{shlex.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    first = run("up", "2")
    leaders = [line.split()[-1] for line in first.splitlines() if "leader pid" in line]
    assert len(leaders) == 2 and leftovers(config)
    second = run("up", "1")
    assert all(not Path(f"/proc/{pid}").exists() for pid in leaders), "the old fleet's containers survived"
    assert "vb-svqx-hv2" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert "hv1  10.213.99.11" in second
    assert run("shell", "hv1", "--", "hostname").strip() == "hv1"
    run("down")
    assert leftovers(config) == []
