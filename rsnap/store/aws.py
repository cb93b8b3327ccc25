"""The AWS shared config file: a profile's region and endpoint_url (OpenDAL reads only the
credentials from it). Parsed only when the environment leaves one of them open."""
from __future__ import annotations

import os


def profile_settings(profile: str) -> dict:
    path = os.environ.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config")
    if not os.path.isfile(path):
        return {}
    import configparser
    cp = configparser.RawConfigParser()
    try:
        cp.read(path)
    except configparser.Error:
        return {}
    section = "default" if profile == "default" else f"profile {profile}"
    return dict(cp.items(section)) if cp.has_section(section) else {}
