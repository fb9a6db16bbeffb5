#!/usr/bin/env python3
"""Small HTML helper for scripts/dokuwiki-e2e.sh (Python 3 standard library only).

Reads one DokuWiki HTML page on stdin and prints what the shell script needs:

  form FORMID [NAME=VALUE | NAME=@FILE]...
        the urlencoded POST body of form FORMID: its hidden/text inputs and
        textareas as the page has them, overridden/extended by the arguments
  field NAME          the value of the first <input name=NAME> (e.g. sectok)
  revisions           the ?do=revisions list, one normalized line per revision:
                      date | summary | user | size change | current?
  recent              the ?do=recent list, one line per entry:
                      date | page | summary | user
  lastmod             the "Last modified ..." line (div.docInfo), as text
  search              page ids in the full-text search results, one a line
  content             the rendered page body (div.page) as text
  snippet WHAT        raw HTML of the revisions/recent list (WHAT = revisions|recent)
  loggedin            prints the login name if the page shows a logged-in user
  each CMD FILE...    runs CMD on each FILE instead of stdin (one Python start for many)
"""
import html
import re
import sys
import urllib.parse
from html.parser import HTMLParser


def text_of(fragment):
    """Tags stripped, entities decoded, whitespace collapsed."""
    t = re.sub(r"<[^>]*>", " ", fragment)
    t = html.unescape(t)
    return re.sub(r"\s+", " ", t).strip()


class FormParser(HTMLParser):
    """Collects the inputs and textareas of one form, in order."""

    def __init__(self, form_id):
        super().__init__(convert_charrefs=True)
        self.form_id = form_id
        self.depth = 0  # >0 while inside the wanted form
        self.fields = []
        self.found = False
        self.textarea = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            if self.depth:
                self.depth += 1
            elif a.get("id") == self.form_id:
                self.depth = 1
                self.found = True
            return
        if not self.depth:
            return
        if tag == "input":
            typ = (a.get("type") or "text").lower()
            name = a.get("name")
            if not name or typ in ("submit", "button", "image", "file", "reset"):
                return
            if typ in ("checkbox", "radio") and "checked" not in a:
                return
            self.fields.append([name, a.get("value") or ""])
        elif tag == "textarea" and a.get("name"):
            self.textarea = [a["name"], ""]
            self.fields.append(self.textarea)

    def handle_endtag(self, tag):
        if tag == "form" and self.depth:
            self.depth -= 1
        elif tag == "textarea":
            self.textarea = None

    def handle_data(self, data):
        if self.textarea is not None:
            self.textarea[1] += data


def cmd_form(page, form_id, *overrides):
    p = FormParser(form_id)
    p.feed(page)
    if not p.found:
        sys.exit(f"dwhtml: no form with id {form_id!r} in the page")
    fields = [tuple(f) for f in p.fields]
    for o in overrides:
        name, _, value = o.partition("=")
        if value.startswith("@"):
            with open(value[1:], encoding="utf-8") as f:
                value = f.read()
        fields = [f for f in fields if f[0] != name] + [(name, value)]
    sys.stdout.write(urllib.parse.urlencode(fields))


def cmd_field(page, name):
    for m in re.finditer(r"<input\b[^>]*>", page):
        tag = m.group(0)
        if re.search(r'\bname="%s"' % re.escape(name), tag):
            v = re.search(r'\bvalue="([^"]*)"', tag)
            print(html.unescape(v.group(1)) if v else "")
            return
    sys.exit(f"dwhtml: no input named {name!r}")


def list_block(page, what):
    """The <ul> of the revisions or recent-changes form, raw."""
    form_id = {"revisions": "page__revisions", "recent": "dw__recent"}[what]
    m = re.search(r'<form\b[^>]*id="%s"[^>]*>(.*?)</form>' % form_id, page, re.S)
    if not m:
        return ""
    ul = re.search(r"<ul\b.*</ul>", m.group(1), re.S)
    return ul.group(0) if ul else ""


def items(block):
    return re.findall(r"<li\b[^>]*>(.*?)</li>", block, re.S)


def span(li, cls):
    m = re.search(r'<span class="%s[^"]*">(.*?)</span>' % cls, li, re.S)
    return text_of(m.group(1)) if m else ""


def span_user(li):
    # <span class="user">...<bdi>alice</bdi>...</span> (may nest <bdo>/<bdi>)
    m = re.search(r'<span class="user">(.*?)</span>', li, re.S)
    return text_of(m.group(1)) if m else ""


def revision_lines(page):
    out = []
    for li in items(list_block(page, "revisions")):
        date = span(li, "date")
        summ = span(li, "sum").lstrip("–- ").strip()
        user = span_user(li)
        size = span(li, "sizechange")
        cur = "current" if re.search(r"\(\s*current\s*\)", text_of(li)) else ""
        out.append(f"{date} | {summ} | {user} | {size} | {cur}".rstrip(" |"))
    return out


def cmd_revisions(page):
    for line in revision_lines(page):
        print(line)


def cmd_revisions_top(page):
    """Only the first (current) line of the revisions list."""
    lines = revision_lines(page)
    print(lines[0] if lines else "(empty revisions list)")


def cmd_recent(page):
    for li in items(list_block(page, "recent")):
        date = span(li, "date")
        summ = span(li, "sum").lstrip("–- ").strip()
        user = span_user(li)
        # the page (or media) link is the last link before the summary
        links = re.findall(r"<a\b[^>]*>(.*?)</a>", li.split('<span class="sum"')[0], re.S)
        pid = text_of(links[-1]) if links else "?"
        print(f"{date} | {pid} | {summ} | {user}")


def cmd_lastmod(page):
    m = re.search(r'<div class="docInfo">(.*?)</div>', page, re.S)
    print(text_of(m.group(1)) if m else "")


def cmd_search(page):
    seen = []
    m = re.search(r'<dl class="search_results">(.*?)</dl>', page, re.S)
    if m:
        for dt in re.findall(r"<dt\b[^>]*>(.*?)</dt>", m.group(1), re.S):
            t = re.search(r'title="([^"]*)"', dt)
            if t and t.group(1) not in seen:
                seen.append(html.unescape(t.group(1)))
    for s in seen:
        print(s)


def cmd_content(page):
    m = re.search(r'<div class="page group">(.*?)<div class="docInfo">', page, re.S)
    if not m:
        m = re.search(r'<!-- wikipage start -->(.*?)<!-- wikipage stop -->', page, re.S)
    print(text_of(m.group(1)) if m else "")


def cmd_snippet(page, what):
    print(list_block(page, what).strip())


def cmd_loggedin(page):
    if "do=logout" not in page:
        return
    m = re.search(r'<li class="user">(.*?)</li>', page, re.S)
    print(text_of(m.group(1)) if m else "(logged in)")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "each" and args:
        fn = globals().get("cmd_" + args[0])
        if not fn:
            sys.exit(__doc__)
        for name in args[1:]:
            with open(name, encoding="utf-8", errors="replace") as f:
                fn(f.read())
        return
    page = sys.stdin.read()
    fn = globals().get("cmd_" + cmd)
    if not fn:
        sys.exit(__doc__)
    fn(page, *args)


if __name__ == "__main__":
    main()
