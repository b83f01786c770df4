"""Where the quoted history of a reply starts, in the languages real clients write.

Three shapes mark it: an attribution line ("On Mon, 30 Sep 2024, Bob <b@x> wrote:",
wrapped over up to four lines), an Outlook-style header block (two or more
"From:/Sent:/To:" lines in a row) and a separator line ("-----Original
Message-----"). They are found by one pass over the lines with plain string
tests (prefix, suffix, membership), never a backtracking regex over the text:
each line is looked at a bounded number of times, over at most MAX_CANDIDATE
characters, so the cost is linear in the text's length whatever it holds
(mail-parser-reply's patterns took 12-18 s on ``"On " * 6000``).

To add a language, add its client phrasings to the tables below and a corpus
entry (tests/corpus/) with the expected ``content``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

MAX_CANDIDATE = 500  # characters: an attribution (joined lines) longer than this is not one
_MAX_JOIN = 4  # lines one attribution may be wrapped over
_CHECK_EVERY = 64  # lines between two looks at the clock
_WIDE_COLON = "\uff1a"  # what Chinese and Japanese clients end attributions and fields with


class StripBudgetExceeded(TimeoutError):
    """Stripping took longer than its wall-clock budget (the caller keeps the whole text)."""


class Deadline:
    """A wall-clock budget, checked between lines."""

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise StripBudgetExceeded("quote stripping ran out of time")


@dataclass(frozen=True)
class _Attribution:
    """One client's attribution line, lower-cased: it starts with one of ``starts``
    (any start when empty), holds every one of ``holds`` and ends with one of ``ends``
    (a final " :" or fullwidth colon read as ":"); when ``dated``, it holds a digit
    too (every client writes a date or time), so "Le directeur a écrit :" in running
    text is not taken for one."""

    starts: tuple[str, ...]
    ends: tuple[str, ...]
    holds: tuple[str, ...] = ()
    dated: bool = True


# The phrasings of Gmail, Outlook, Apple Mail and Thunderbird, per language.
_ATTRIBUTIONS = (
    # en: "On Mon, 30 Sep 2024 at 18:15, Bob <b@x> wrote:" (Gmail, Apple, Thunderbird)
    _Attribution(("on ",), ("wrote:",), dated=False),
    # de: "Am 30.09.2024 um 18:15 schrieb Bob <b@x>:"
    _Attribution(("am ",), (":",), (" schrieb ",), dated=False),
    # fr: "Le lun. 30 sept. 2024 à 18:15, Bob <b@x> a écrit :"
    _Attribution(("le ",), ("a écrit:",)),
    # es: "El lun, 30 sept 2024 a las 18:15, Bob (<b@x>) escribió:"
    _Attribution(("el ",), ("escribió:",)),
    # it: "Il giorno lun 30 set 2024 alle ore 18:15 Bob <b@x> ha scritto:",
    #     "Il 30/09/24 18:15, Bob ha scritto:"
    _Attribution(("il ",), ("ha scritto:",)),
    # pt: "Em seg., 30 de set. de 2024 às 18:15, Bob <b@x> escreveu:"
    _Attribution(("em ",), ("escreveu:",)),
    # pt-PT Gmail: "Bob <b@x> escreveu no dia segunda, 30/09/2024 à(s) 18:15:"
    _Attribution((), (":",), (" escreveu no dia ",)),
    # nl: "Op ma 30 sep 2024 om 18:15 schreef Bob <b@x>:"
    _Attribution(("op ",), (":",), (" schreef ",)),
    # nl Apple Mail: "Op 30 sep 2024, om 18:15 heeft Bob <b@x> het volgende geschreven:"
    _Attribution(("op ",), ("het volgende geschreven:",)),
    # pl Gmail: "pon., 30 wrz 2024 o 18:15 Bob <b@x> napisał(a):"
    _Attribution((), ("napisał(a):", "napisała:", "nadesłał:")),
    # pl Thunderbird: "W dniu 30.09.2024 o 18:15, Bob pisze:"
    _Attribution(("w dniu ",), ("pisze:",)),
    # pl Apple Mail: "Wiadomość napisana przez Bob <b@x> w dniu 30.09.2024, o godz. 18:15:"
    _Attribution(("wiadomość napisana przez ",), (":",), (" w dniu ",)),
    # sv: "Den mån 30 sep. 2024 kl 18:15 skrev Bob <b@x>:", "Den 2024-09-30 kl. 18:15, skrev Bob:",
    #     Apple Mail: "30 sep. 2024 kl. 18:15 skrev Bob <b@x>:"
    _Attribution((), (":",), (" kl", " skrev ")),
    # ru Gmail: "пн, 30 сент. 2024 г. в 18:15, Bob <b@x>:"
    _Attribution((), (">:",), (" г. в ",)),
    # ru Apple Mail / Thunderbird: "... Bob <b@x> написал(а):", "30.09.2024 18:15, Bob пишет:"
    _Attribution((), ("написал(а):", "написал:", "написала:", "пишет:")),
    # ja Gmail: "2024年9月30日(月) 18:15 Bob <b@x>:"
    _Attribution((), (">:",), ("年", "月", "日")),
    # ja Apple Mail: "2024/09/30 18:15、Bob <b@x>のメール:";
    #    Thunderbird: "... Bob さんは書きました:"
    _Attribution((), ("のメール:", "さんは書きました:", "は書きました:")),
    # zh: "Bob <b@x> 于2024年9月30日周一 18:15写道" + fullwidth colon,
    #     "在 2024/9/30 18:15, Bob 写道:"
    _Attribution((), ("写道:", "寫道:")),
)
_OPENERS = tuple(sorted({s for a in _ATTRIBUTIONS for s in a.starts}))
_ANY_START = tuple(a for a in _ATTRIBUTIONS if not a.starts)

# Field names of the header block Outlook (and others) put above the quoted mail,
# lower-cased, per language. A block is two field lines of one language in a row.
_FIELDS_BY_LANGUAGE = {
    "en": ("from", "sent", "to", "subject", "date", "cc", "organization"),
    "de": ("von", "gesendet", "an", "betreff", "datum", "cc", "organisation"),
    "fr": ("de", "envoyé", "à", "objet", "date", "cc"),
    "es": ("de", "enviado", "para", "asunto", "fecha", "cc"),
    "it": ("da", "inviato", "a", "oggetto", "data", "cc"),
    "pt": ("de", "enviado", "enviada", "para", "assunto", "data", "cc"),
    "nl": ("van", "verzonden", "aan", "onderwerp", "datum", "cc"),
    "pl": ("od", "wysłano", "do", "temat", "data", "dw"),
    "sv": ("från", "skickat", "till", "ämne", "datum", "kopia"),
    "ru": ("от", "отправлено", "кому", "тема", "дата", "копия"),
    "ja": ("差出人", "送信日時", "宛先", "件名", "cc"),
    "zh": ("发件人", "发送时间", "收件人", "主题", "抄送", "寄件者", "寄件日期", "收件者", "主旨"),
}
_FIELDS: dict[str, frozenset[str]] = {}
for _language, _names in _FIELDS_BY_LANGUAGE.items():
    for _name in _names:
        _FIELDS[_name] = _FIELDS.get(_name, frozenset()) | {_language}
_MAX_FIELD_NAME = max(len(name) for name in _FIELDS)
_NO_FIELD: tuple[frozenset[str], bool] = (frozenset(), False)

# "-----Original Message-----" and its translations (the text between the dashes).
_SEPARATORS = frozenset(
    {
        "original message", "ursprüngliche nachricht", "message d'origine",
        "mensaje original", "messaggio originale", "mensagem original",
        "oorspronkelijk bericht", "wiadomość oryginalna", "ursprungligt meddelande",
        "originalmeddelande", "исходное сообщение", "元のメッセージ", "原始邮件", "原始郵件",
    }
)  # fmt: skip


def _bare(line: str) -> str:
    """A line without its quote markers, bullets/bold stars and outer whitespace, lower-cased."""
    return line.strip().lstrip(">* \t").lower()


def _colon_end(text: str) -> str:
    """``text`` with a final " :" (French spacing) or a fullwidth colon read as ":"."""
    text = text.rstrip()
    if text.endswith((_WIDE_COLON, ":")):
        text = text[:-1].rstrip() + ":"
    return text


def _is_attribution(candidate: str, opened: bool) -> bool:
    text = _colon_end(candidate.replace("\u00a0", " "))
    if not text.endswith(":"):
        return False
    rules = _ATTRIBUTIONS if opened else _ANY_START
    for rule in rules:
        if rule.starts and not text.startswith(rule.starts):
            continue
        if not text.endswith(rule.ends) or not all(h in text for h in rule.holds):
            continue
        if not rule.dated or any(ch.isdigit() for ch in text):
            return True
    return False


def _field(bare: str) -> tuple[frozenset[str], bool]:
    """(the languages whose header-block field this line is, its value is empty)."""
    colon = bare.find(":", 0, _MAX_FIELD_NAME + 3)
    wide = bare.find(_WIDE_COLON, 0, _MAX_FIELD_NAME + 3)
    if colon < 0 or (0 <= wide < colon):
        colon = wide
    if colon <= 0:
        return _NO_FIELD
    languages = _FIELDS.get(bare[:colon].rstrip(" *\u00a0"))
    if languages is None:
        return _NO_FIELD
    return languages, not bare[colon + 1 :].strip(" *\t\u00a0")


def _is_separator(bare: str) -> bool:
    if not (bare.startswith("---") and bare.endswith("---")):
        return False
    return bare.strip("- ") in _SEPARATORS


def find_reply_header(lines: list[str], deadline: Deadline | None = None) -> int | None:
    """The index of the first line of the first quoted-reply header in ``lines``, or None.

    Linear: every line is tested once as a field line and a separator, and as
    the first of at most _MAX_JOIN lines of an attribution no longer than
    MAX_CANDIDATE characters.
    """
    bares = [_bare(line) for line in lines]
    fields = [_field(bare) for bare in bares]
    for i, bare in enumerate(bares):
        if deadline is not None and i % _CHECK_EVERY == 0:
            deadline.check()
        if not bare:
            continue
        languages, empty = fields[i]
        if languages:
            # Two field lines of one language in a row; a field with an empty
            # value may have it on the next line (or the one after).
            reach = 4 if empty else 2
            if any(languages & fields[j][0] for j in range(i + 1, min(i + reach, len(fields)))):
                return i
        if _is_separator(bare):
            return i
        if len(bare) > MAX_CANDIDATE:
            continue
        opened = bare.startswith(_OPENERS)
        # A wrapped attribution is one paragraph; one without an opening word
        # ("pon., 30 wrz 2024 ...") must start one, or a signature above it would
        # be read as its first line.
        paragraph = i == 0 or not bares[i - 1]
        candidate = bare
        for j in range(i, min(i + _MAX_JOIN, len(bares))):
            if j > i:
                if not bares[j] or not (opened or paragraph):
                    break
                candidate = f"{candidate} {bares[j]}"
                if len(candidate) > MAX_CANDIDATE:
                    break
            if candidate.endswith((":", _WIDE_COLON)) and _is_attribution(candidate, opened):
                return i
    return None
