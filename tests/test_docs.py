"""The README describes what the code has: the options table is the one Config makes, and every
/status field and every /metrics family is named, read from the running code rather than from a
list kept by hand, so that neither side can drift from the other. Also: the README's examples use
`python3`, which every system has."""

from __future__ import annotations

import re

from conftest import ROOT, lb

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_options_table_is_the_one_config_makes():
    start = README.index("<!-- options table: generated from Config, do not edit by hand -->\n")
    end = README.index("<!-- end of options table -->")
    table = README[README.index("\n", start) + 1:end]
    assert table == lb.options_table(), "regenerate with python3 -c 'import load_balancer; " \
                                        "print(load_balancer.options_table())'"


def test_readme_documents_every_status_field_and_metric_family(upstreams, balancer):
    up, = upstreams(1)
    b = balancer([up.url], admin_port=0)
    status = b.status(history=True)
    names = set(status) | {f"backends[].{key}" for key in status["backends"][0]}
    forms = lambda name: (f"`{name}`", f"`{name}[]", f"`{name.split('.')[-1]}`", f".{name.split('.')[-1]}`")
    undocumented = sorted(name for name in names if not any(form in README for form in forms(name)))
    assert not undocumented, f"/status fields missing from README.md: {undocumented}"
    families = set(re.findall(r"^# TYPE (\S+) ", b.control.metrics(), re.M))
    assert families, "no metric families"
    assert not sorted(f for f in families if f not in README), "metric families missing from README.md"


def test_readme_runs_python3():
    assert not re.search(r"(?m)^\s*python (?!3)", README), "use python3 in examples: Debian has no `python`"
