"""Quoted history in twelve languages: the attribution lines and header blocks that
Gmail, Outlook, Apple Mail and Thunderbird write, cut; running text that only
looks similar, kept."""

from __future__ import annotations

import pytest

from prx_channel_email._mail.reply_text import new_text
from tests.inbound_helpers import corpus_names

# One real-client reply per language in tests/corpus/ (content checked there).
LANGUAGE_CORPUS = {
    "fr": "gmail_fr_reply",
    "es": "thunderbird_es_reply",
    "it": "apple_mail_it_reply",
    "pt": "gmail_pt_reply",
    "nl": "thunderbird_nl_reply",
    "pl": "gmail_pl_reply",
    "sv": "apple_mail_sv_reply",
    "ru": "gmail_ru_reply",
    "ja": "gmail_ja_reply",
    "zh": "apple_mail_zh_reply",
}


def test_every_language_has_a_corpus_entry() -> None:
    assert set(LANGUAGE_CORPUS.values()) <= set(corpus_names())


NEW = "Thanks, that works for me."
QUOTE = "> the earlier message\n> more of it"

ATTRIBUTIONS = [
    # fr
    "Le lun. 30 sept. 2024 à 18:15, Support Bot <bot@example.net> a écrit :",
    "Le 30 sept. 2024 à 18:15, Support Bot <bot@example.net> a écrit :",
    "Le 30/09/2024 à 18:15, Support Bot a écrit :",
    "Le lun. 30 sept. 2024 à 18:15, Support Bot <bot@example.net> a\nécrit :",
    # es
    "El lun, 30 sept 2024 a las 18:15, Support Bot (<bot@example.net>) escribió:",
    "El 30 sept 2024, a las 18:15, Support Bot <bot@example.net> escribió:",
    "El 30/9/24 a las 18:15, Support Bot escribió:",
    # it
    "Il giorno lun 30 set 2024 alle ore 18:15 Support Bot <bot@example.net> ha scritto:",
    "Il giorno 30 set 2024, alle ore 18:15, Support Bot <bot@example.net> ha scritto:",
    "Il 30/09/24 18:15, Support Bot ha scritto:",
    # pt
    "Em seg., 30 de set. de 2024 às 18:15, Support Bot <bot@example.net> escreveu:",
    "Em 30 de set. de 2024, à(s) 18:15, Support Bot <bot@example.net> escreveu:",
    "Em 30/09/2024 18:15, Support Bot escreveu:",
    "Support Bot <bot@example.net> escreveu no dia segunda, 30/09/2024 à(s) 18:15:",
    # nl
    "Op ma 30 sep 2024 om 18:15 schreef Support Bot <bot@example.net>:",
    "Op 30 sep 2024, om 18:15 heeft Support Bot <bot@example.net> het volgende geschreven:",
    "Op 30-09-2024 om 18:15 schreef Support Bot:",
    # pl
    "pon., 30 wrz 2024 o 18:15 Support Bot <bot@example.net> napisał(a):",
    "Wiadomość napisana przez Support Bot <bot@example.net> w dniu 30.09.2024, o godz. 18:15:",
    "W dniu 30.09.2024 o 18:15, Support Bot pisze:",
    # sv
    "Den mån 30 sep. 2024 kl 18:15 skrev Support Bot <bot@example.net>:",
    "30 sep. 2024 kl. 18:15 skrev Support Bot <bot@example.net>:",
    "Den 2024-09-30 kl. 18:15, skrev Support Bot:",
    # ru
    "пн, 30 сент. 2024 г. в 18:15, Support Bot <bot@example.net>:",
    "30 сент. 2024 г., в 18:15, Support Bot <bot@example.net> написал(а):",
    "30.09.2024 18:15, Support Bot пишет:",
    "пн, 30 сент. 2024 г. в 18:15, Support Bot <\nbot@example.net>:",
    # ja
    "2024年9月30日(月) 18:15 Support Bot <bot@example.net>:",
    "2024/09/30 18:15、Support Bot <bot@example.net>のメール:",
    "2024/09/30 18:15 Support Bot さんは書きました:",
    # zh
    "Support Bot <bot@example.net> 于2024年9月30日周一 18:15写道：",
    "2024年9月30日 18:15，Support Bot <bot@example.net> 写道：",
    "在 2024/9/30 18:15, Support Bot 写道:",
]


@pytest.mark.parametrize("attribution", ATTRIBUTIONS)
@pytest.mark.parametrize("quoted", [False, True], ids=["plain", "quoted"])
def test_attribution_lines_are_cut(attribution: str, quoted: bool) -> None:
    # With ">" quotes below it, and without (HTML mail turned into text).
    history = QUOTE if quoted else "the earlier message\nmore of it"
    assert new_text(f"{NEW}\n\n{attribution}\n\n{history}") == NEW


HEADER_BLOCKS = [
    "Von: Support Bot <bot@example.net>\nGesendet: Montag, 30. September 2024 18:15\n"
    "An: Anna <anna@example.com>\nBetreff: Frage",
    "De : Support Bot <bot@example.net>\nEnvoyé : lundi 30 septembre 2024 18:15\n"
    "À : Léa Martin <lea@example.com>\nObjet : Commande",
    "De: Support Bot <bot@example.net>\nEnviado: lunes, 30 de septiembre de 2024 18:15\n"
    "Para: Carmen <carmen@example.com>\nAsunto: Factura",
    "Da: Support Bot <bot@example.net>\nInviato: lunedì 30 settembre 2024 18:15\n"
    "A: Giulia <giulia@example.com>\nOggetto: Sala",
    "De: Support Bot <bot@example.net>\nEnviado: segunda-feira, 30 de setembro de 2024 18:15\n"
    "Para: João <joao@example.com>\nAssunto: Reembolso",
    "Van: Support Bot <bot@example.net>\nVerzonden: maandag 30 september 2024 18:15\n"
    "Aan: Sanne <sanne@example.com>\nOnderwerp: Levering",
    "Od: Support Bot <bot@example.net>\nWysłano: poniedziałek, 30 września 2024 18:15\n"
    "Do: Kasia <k@example.com>\nTemat: Zamówienie",
    "Från: Support Bot <bot@example.net>\nSkickat: den 30 september 2024 18:15\n"
    "Till: Erik <erik@example.com>\nÄmne: Mötet",
    "От: Support Bot <bot@example.net>\nОтправлено: 30 сентября 2024 г. 18:15\n"
    "Кому: Иван <ivan@example.com>\nТема: Отчёт",
    "差出人: Support Bot <bot@example.net>\n送信日時: 2024年9月30日 18:15\n"
    "宛先: 佐藤 <sato@example.jp>\n件名: 見積書",
    "发件人: Support Bot <bot@example.net>\n发送时间: 2024年9月30日 18:15\n"
    "收件人: 王伟 <wang@example.com>\n主题: 发票",
    "*From:* Support Bot <bot@example.net>\n*Sent:* Monday, September 30, 2024 6:15 PM\n"
    "*To:* Anna <anna@example.com>",
]


@pytest.mark.parametrize("block", HEADER_BLOCKS, ids=lambda b: b.split(":")[0])
def test_outlook_header_blocks_are_cut(block: str) -> None:
    text = f"{NEW}\n\n________________________________\n{block}\n\nthe earlier message"
    assert new_text(text) == NEW


@pytest.mark.parametrize(
    "separator",
    [
        "-----Original Message-----",
        "-----Ursprüngliche Nachricht-----",
        "-----Message d'origine-----",
        "-----Mensaje original-----",
        "-----Messaggio originale-----",
        "-----Mensagem original-----",
        "-----Oorspronkelijk bericht-----",
        "-----Wiadomość oryginalna-----",
        "-----Ursprungligt meddelande-----",
        "-----Исходное сообщение-----",
    ],
)
def test_original_message_separators_are_cut(separator: str) -> None:
    assert new_text(f"{NEW}\n\n{separator}\nthe earlier message") == NEW


@pytest.mark.parametrize(
    "text",
    [
        # Running text that starts and ends like an attribution, without a date.
        "Le directeur a écrit :\nles chiffres sont bons.",
        "El jefe escribió:\nque mañana no hay reunión.",
        "Il professore ha scritto:\nil compito è per lunedì.",
        "Op dinsdag schreef hij:\ndat het klaar is.",
        "Den här veckan skrev jag:\nen rapport om läget.",
        "Он пишет:\nвсё готово.",
        "他写道：\n一切都好。",
        # One field-like line alone, or two from different languages.
        "Subject: the report\nis attached.",
        "Von: mir\nSent: yesterday",
        # Short everyday lines.
        "A: yes\nsee you",
    ],
)
def test_look_alike_running_text_is_kept(text: str) -> None:
    assert new_text(text) == text
