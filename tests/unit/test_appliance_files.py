"""appliance/ holds every file the image installs, each installed by exactly one Ansible
role (its ``appliance_files`` list), and its templates render with the roles' variables
(what the image build would fail on, found without building it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import yaml

ROOT = Path(__file__).resolve().parents[2]
APPLIANCE = ROOT / "appliance"
ROLES = ROOT / "ansible" / "roles"
# Set by image/build on the playbook's command line (ansible/site.yml).
BUILD_VARS = {"sgw_version": "0.1.0", "sgw_release_size": "1", "sgw_release_python": "3.11.2"}


def role_lists() -> dict[str, list[str]]:
    """Each role's ``appliance_files`` paths (the include of tasks/appliance_files.yml)."""
    lists: dict[str, list[str]] = {}
    for tasks_file in sorted(ROLES.glob("*/tasks/main.yml")):
        role = tasks_file.parents[1].name
        for task in yaml.safe_load(tasks_file.read_text()):
            if "appliance_files.yml" not in str(task.get("ansible.builtin.include_tasks", "")):
                continue
            for item in task["vars"]["appliance_files"]:
                lists.setdefault(role, []).append(item["path"] if isinstance(item, dict) else item)
    return lists


def role_variables() -> dict[str, Any]:
    """Every role's defaults and the build's variables, rendered as Ansible would."""
    raw: dict[str, Any] = dict(BUILD_VARS)
    for defaults in sorted(ROLES.glob("*/defaults/main.yml")):
        for name, value in yaml.safe_load(defaults.read_text()).items():
            raw.setdefault(name, value)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return {k: env.from_string(v).render(raw) if isinstance(v, str) else v for k, v in raw.items()}


def test_every_file_is_installed_by_exactly_one_role() -> None:
    on_disk = {
        str(p.relative_to(APPLIANCE))
        for p in APPLIANCE.rglob("*")
        if p.is_file() and p.name != "README.md"
    }
    listed = [path for paths in role_lists().values() for path in paths]
    assert sorted(set(listed)) == sorted(listed), "a file listed by two roles"
    assert set(listed) - on_disk == set(), "listed by a role, missing in appliance/"
    assert on_disk - set(listed) == set(), "in appliance/, installed by no role"


def test_roles_that_install_files() -> None:
    assert set(role_lists()) == {"base", "hardening", "lio", "disks", "gateway", "firstboot"}


def test_templates_render_with_the_roles_variables() -> None:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    variables = role_variables()
    templates = sorted(APPLIANCE.rglob("*.j2"))
    assert templates
    for template in templates:
        text = env.from_string(template.read_text()).render(variables)
        assert "{{" not in text and "{%" not in text, template
    unit = env.from_string(
        (APPLIANCE / "etc/systemd/system/sgw-gateway.service.j2").read_text()
    ).render(variables)
    assert "ExecStart=/opt/sgw/current/bin/python -m sgw.gateway.supervisor --config" in unit
