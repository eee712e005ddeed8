"""Prompt templates as text: parsing, checking, CLIP's ImageNet set, a class set written back as YAML, and the
exact strings the text encoder sees. No torch: ``clipes prompts show`` and the checks before a model loads use it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path

import yaml

from .errors import ClipesError
from .prompts import ClassSet, _key, _template_ok

__all__ = ["TemplateError", "candidate_templates", "check_template", "class_set_yaml", "imagenet_templates",
           "parse_templates", "prompt_strings", "read_templates", "with_template"]

TEMPLATES_FILE = "imagenet_templates.txt"


class TemplateError(ClipesError):
    """A template file is empty or unreadable, or a template lacks its single ``{}``."""


def check_template(template: str, where: str) -> str:
    """A template holds exactly one ``{}`` for the class prompt, as class sets require (``{{ }}`` are literal)."""
    if not _template_ok(template):
        raise TemplateError(f"{where}: template {template!r} needs exactly one '{{}}' for the class name "
                            "and no other field (write '{{' and '}}' for literal braces)")
    return template


def parse_templates(text: str, where: str) -> list[str]:
    """One template per line; blank lines and lines starting with ``#`` are skipped."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(check_template(line, f"{where}:{lineno}"))
    if not out:
        raise TemplateError(f"{where}: no templates (write one per line, each with '{{}}' for the class name)")
    return out


def read_templates(path: Path) -> list[str]:
    """User templates from ``--templates FILE``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"--templates {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"--templates {path}: cannot read it ({e})") from None
    return parse_templates(text, str(path))


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet templates (Radford et al., 2021), as shipped in ``clipes/prompts/``."""
    text = resources.files("clipes.prompts").joinpath(TEMPLATES_FILE).read_text(encoding="utf-8")
    return parse_templates(text, TEMPLATES_FILE)


def candidate_templates(class_set: ClassSet, extra: Sequence[str] = (), imagenet: bool = True) -> list[str]:
    """CLIP's ImageNet templates (unless ``imagenet`` is False), then the class set's own (CLIP-ES's
    ``a clean origami {}.`` for voc and coco), then the user's; each once, first appearance kept."""
    return list(dict.fromkeys([*(imagenet_templates() if imagenet else ()), *class_set.templates, *extra]))


def with_template(class_set: ClassSet, template: str) -> ClassSet:
    """The same classes, prompts, aliases and background with ``template`` as the only template."""
    return replace(class_set, templates=(check_template(template, "template"),))


def class_set_yaml(class_set: ClassSet, header: str = "") -> str:
    """The class set in ``load_class_set``'s YAML schema (name, prompt, aliases per class; background;
    templates; box_threshold), so that ``clipes label --classes FILE.yaml`` uses it as is."""
    classes = []
    for i, (name, prompt) in enumerate(zip(class_set.classes, class_set.prompts, strict=True)):
        entry: dict = {"name": name, "prompt": prompt}
        aliases = [a for a, j in class_set.aliases.items() if j == i and a != _key(name)]
        if aliases:
            entry["aliases"] = aliases
        classes.append(entry)
    data = {"name": class_set.name, "box_threshold": class_set.box_threshold, "templates": list(class_set.templates),
            "classes": classes, "background": list(class_set.background)}
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)


def prompt_strings(names: list[str] | tuple[str, ...], templates: tuple[str, ...]) -> list[str]:
    """The strings the text encoder sees, name-major: every template filled with each name in turn."""
    return [t.format(n) for n in names for t in templates]
