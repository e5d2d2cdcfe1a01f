"""docs/configuration.md names every setting the config parser knows, so a new setting
cannot ship undocumented."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmux_extproc.control import config

REFERENCE = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()

SECTIONS = {
    "llmux": config.LLMUX_KEYS,
    "llmux.circuit_breaker": set(config.BREAKER_KEYS),
    "general_settings": config.GENERAL_KEYS,
    "litellm_settings": config.LITELLM_KEYS,
    "router_settings": config.ROUTER_KEYS | config.UNSUPPORTED_ROUTER_KEYS,
    "litellm_params prices": config.PRICE_KEYS,
}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_setting_is_in_the_configuration_reference(section: str) -> None:
    missing = sorted(key for key in SECTIONS[section] if f"`{key}`" not in REFERENCE)
    assert missing == [], f"docs/configuration.md lacks {section} keys {missing}"
