"""The product recipe: the template is valid, and every mistake is one sentence naming its field."""

from __future__ import annotations

import pytest

from stampline import recipe
from stampline.errors import UsageError


def test_template_is_a_valid_recipe() -> None:
    loaded = recipe.parse(recipe.TEMPLATE)
    assert loaded.chip == "esp32c3" and loaded.device_key == "ec-p256"
    assert loaded.serial(42) == "ACME-000042"
    assert loaded.subject_attributes("ACME-000042") == {"common_name": "ACME-000042", "organization": "Acme Devices"}
    assert loaded.nvs_keys["certificate"] == "cert" and loaded.firmware["application"].min_version == (1, 0, 0)


BAD = [
    ("device_key: ec-p256", "device_key: rsa-1024", "device_key: 'rsa-1024' is not one of ec-p256, rsa-2048, rsa-3072."),
    ("chip: esp32c3", "chip: esp8266", "chip: 'esp8266' is not one of"),
    ('template: "ACME-{counter:06d}"', 'template: "ACME-{serial}"', "serial.template: the template uses unknown field {serial}"),
    ('template: "ACME-{counter:06d}"', 'template: "ACME"', "serial.template: the template must contain {counter}."),
    ('template: "ACME-{counter:06d}"', 'template: "ACME {counter}"', "serial.template: gives 'ACME 1'"),
    ('common_name: "{serial}"', 'common_name: "{counter.__class__}"', "subject.common_name: the template uses unknown field"),
    ("validity_days: 7300", "validity_days: -1", "certificate.validity_days: must be between 1 and 36500 days."),
    ("validity_days: 7300", "validity_days: many", "certificate.validity_days: must be a whole number"),
    ("namespace: stamp", "namespace: a-very-long-namespace", "nvs.namespace: 'a-very-long-namespace' must be 1-15"),
    ("    serial: serial\n", "    serial: cert\n", "nvs.keys: two stamp entries use the same NVS key."),
    ('url: "mqtts://127.0.0.1:8883"', 'url: "http://x"', "endpoint.url: 'http://x' must look like mqtts://host:port."),
    ('min_version: "1.0.0"', 'min_version: "latest"', "firmware.manufacturing.min_version: 'latest' is not a version"),
    ("chip: esp32c3", "chip: esp32c3\ncolour: blue", "colour: is not a recipe field"),
    ("chip: esp32c3", "chip: [esp32c3]", "chip: must be a string, not ['esp32c3']."),
]


@pytest.mark.parametrize("old,new,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_recipe_field_is_named(old: str, new: str, message: str) -> None:
    text = recipe.TEMPLATE.replace(old, new, 1)
    assert text != recipe.TEMPLATE
    with pytest.raises(UsageError) as error:
        recipe.parse(text, "r.yaml")
    assert str(error.value).startswith("r.yaml: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_field_and_bad_yaml() -> None:
    with pytest.raises(UsageError, match="r.yaml: chip: is required."):
        recipe.parse(recipe.TEMPLATE.replace("chip: esp32c3", ""), "r.yaml")
    with pytest.raises(UsageError, match="is not valid YAML at line 3"):
        recipe.parse("a: 1\nb: [\n", "r.yaml")


def test_version_parsing() -> None:
    assert recipe.parse_version("v1.2.3-rc1") == (1, 2, 3)
    assert recipe.parse_version("1.2") is None and recipe.parse_version("1.2.3\x00") is None


@pytest.mark.parametrize("old,new,message", [
    ("namespace: stamp", "namespace: device", "'device' is the manufacturing firmware's own namespace."),
    ('common_name: "{serial}"', 'common_name: "{serial}-' + "x" * 60 + '"', "renders to"),
    ("partition: fctry", "partition: nvs", "keeps the stamp in 'fctry'"),
    ('template: "ACME-{counter:06d}"', 'template: "ACME-{counter:06d}' + "0" * 53 + '"', "gives"),
])
def test_recipe_refuses_what_would_fail_on_every_device(old: str, new: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe.parse(recipe.TEMPLATE.replace(old, new, 1), "r.yaml")


def test_empty_recipe_is_one_plain_sentence() -> None:
    with pytest.raises(UsageError) as error:
        recipe.parse("", "r.yaml")
    assert str(error.value) == "r.yaml: must be a mapping."
