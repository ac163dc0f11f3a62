"""Every relative link and #anchor in README.md and docs/*.md resolves, by GitHub's anchor rules
(inline links, reference-style links and their definitions, HTML href and src); the README never
points outside the repository; every guide can be reached from the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.markdown import REPO, anchors, doc_files, github_slug, links, rel, undefined_references


def _resolve(doc: Path, target: str) -> tuple[Path, str]:
    path, _, anchor = target.partition("#")
    return ((doc.parent / path).resolve() if path else doc), anchor


def broken_links(doc: Path, root: Path = REPO) -> list[str]:
    broken = [f"{rel(doc)}:{line}: [{label}] is not defined" for line, label in undefined_references(doc)]
    for line, target in links(doc):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, anchor = _resolve(doc, target)
        if not path.exists() or root not in (path, *path.parents):
            broken.append(f"{rel(doc)}:{line}: {target} (no such file in the repository)")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{rel(doc)}:{line}: {target} (no heading '#{anchor}' in {rel(path)})")
    return broken


@pytest.mark.parametrize("doc", doc_files(), ids=rel)
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    broken = broken_links(doc)
    assert not broken, "\n".join(broken)


def test_reference_links_and_html_links_are_checked_too(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## Kept heading\n")
    doc = tmp_path / "guide.md"
    doc.write_text(
        "# Guide\n\nSee [the other guide][other], [kept][] and [gone][nowhere].\n"
        '<a href="other.md#no-such-heading">x</a> <img src="missing.png">\n\n'
        "[other]: other.md#renamed-heading\n[Kept]: <other.md#kept-heading>\n"
    )
    assert broken_links(doc, tmp_path) == [
        "guide.md:3: [nowhere] is not defined",
        "guide.md:4: other.md#no-such-heading (no heading '#no-such-heading' in other.md)",
        "guide.md:4: missing.png (no such file in the repository)",
        "guide.md:6: other.md#renamed-heading (no heading '#renamed-heading' in other.md)",
    ]


def test_the_readme_points_only_inside_the_repository() -> None:
    readme = REPO / "README.md"
    outside = [t for _, t in links(readme) if "://" in t or t.startswith(("/", "mailto:"))]
    assert outside == []
    assert "http" not in readme.read_text()


def test_every_guide_is_reachable_from_the_readme() -> None:
    seen, todo = set(), [REPO / "README.md"]
    while todo:
        doc = todo.pop()
        if doc in seen:
            continue
        seen.add(doc)
        for _, target in links(doc):
            path, _ = _resolve(doc, target)
            if path.suffix == ".md" and path.is_file() and "://" not in target:
                todo.append(path)
    unreachable = [rel(p) for p in doc_files() if p not in seen]
    assert unreachable == [], "link these from README.md or from a guide it links"


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Two commands", "two-commands"),
        ("Preemptible jobs: `train.resume=auto`", "preemptible-jobs-trainresumeauto"),
        ("Fine-tuning from a checkpoint: `train.init_from`", "fine-tuning-from-a-checkpoint-traininit_from"),
        (
            "Train step against transformers' `MixtralForCausalLM`",
            "train-step-against-transformers-mixtralforcausallm",
        ),
        ("One line per error, under every launcher", "one-line-per-error-under-every-launcher"),
        ("`make train` from a fresh clone", "make-train-from-a-fresh-clone"),
        ("Export, import & the [Hub](hub.md)", "export-import--the-hub"),
        ("Größe × Ausgabe", "größe--ausgabe"),
    ],
)
def test_anchors_follow_githubs_slug_rules(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_a_repeated_heading_gets_a_numbered_anchor(tmp_path: Path) -> None:
    doc = tmp_path / "a.md"
    doc.write_text("# Notes\n\n```bash\n# Notes\n```\n\n## Notes\n\n### Notes\n")
    assert anchors(doc) == {"notes", "notes-1", "notes-2"}
