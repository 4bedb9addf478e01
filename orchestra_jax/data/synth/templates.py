"""Domain templates for the procedural backend: data models, record factories and write-tool templates.

A template is data: the data model (in the domain environment's format), which table holds the users (found
by a unique email), the field each owned table uses to point at its user, how a user names a record (`labels`),
which fields a user may ask about (`lookups`), record factories (seeded), and write tools with the sentence a
user would say. Read and search tools are derived from the data model by procedural.py.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from typing import Any

FIRST = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Mei",
         "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe"]
LAST = ["Abbott", "Baker", "Castro", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito", "Jensen", "Kowalski",
        "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Quist", "Rossi", "Silva", "Tanaka", "Ueda", "Varga"]
WORDS = ["Silent", "River", "Glass", "Winter", "Hidden", "Garden", "Copper", "Moon", "Paper", "Harbor", "Iron",
         "Lantern", "Quiet", "Orchard", "Salt", "Ember", "North", "Velvet", "Stone", "Echo"]


def S(description: str, **kw: Any) -> dict:
    return {"type": "string", "description": description, **kw}


def N(description: str, **kw: Any) -> dict:
    return {"type": "number", "description": description, **kw}


def I(description: str, **kw: Any) -> dict:  # noqa: E743
    return {"type": "integer", "description": description, **kw}


def person(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return f"{first} {last}", f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@example.com"


def digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(n))


def date(rng: random.Random, year: int = 2025) -> str:
    return f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def money(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), 2)


def pick(rng: random.Random, records: Mapping[str, dict], where: Callable[[dict], bool] = lambda r: True) -> dict | None:
    options = [r for _, r in sorted(records.items()) if where(r)]
    return rng.choice(options) if options else None


@dataclasses.dataclass(frozen=True)
class WriteTemplate:
    """A write tool plus how a user asks for it. `phrase` formats with the record's fields, `label` and the
    arguments; `args(rng, db, record_or_user)` draws the non-key arguments (for create: all but the owner)."""

    tool: Mapping[str, Any]
    phrase: str
    args: Callable[[random.Random, Mapping, Mapping], dict] = lambda rng, db, record: {}


@dataclasses.dataclass(frozen=True)
class DomainTemplate:
    name: str
    subjects: tuple[str, ...]
    data_model: Mapping[str, Any]
    user_table: str
    owner_field: str
    labels: Mapping[str, str]
    lookups: tuple[tuple[str, str], ...]
    factories: Mapping[str, Callable[[random.Random, Mapping, str], dict | None]]
    writes: tuple[WriteTemplate, ...]
    entity: Mapping[str, str]  # table -> singular noun used in tool names and sentences


def _update(name, table, key, description, pre, effects, params=None):
    parameters = {key: S(f"id of the {table[:-1]}")} | (params or {})
    return {"name": name, "description": description, "kind": "update", "table": table, "parameters": parameters,
            "key_param": key, "preconditions": pre, "effects": effects}


# ------------------------------------------------------------------------------------------------ bank


def _bank_factories():
    def client(rng, db, key):
        name, email = person(rng)
        return {"client_id": key, "name": name, "email": email, "phone": f"+1-555-{digits(rng, 4)}",
                "status": rng.choice(["active", "active", "restricted"])}

    def owned(make):
        def factory(rng, db, key):
            owner = pick(rng, db["clients"])
            return None if owner is None else make(rng, db, key, owner)
        return factory

    def account(rng, db, key, owner):
        return {"account_id": key, "client_id": owner["client_id"], "kind": rng.choice(["checking", "savings"]),
                "last_four": digits(rng, 4), "balance": money(rng, 0, 9000),
                "status": rng.choice(["active", "active", "active", "frozen"])}

    def card(rng, db, key, owner):
        acct = pick(rng, db["accounts"], lambda a: a["client_id"] == owner["client_id"])
        if acct is None:
            return None
        return {"card_id": key, "client_id": owner["client_id"], "account_id": acct["account_id"],
                "last_four": digits(rng, 4), "status": rng.choice(["active", "active", "blocked"]),
                "daily_limit": float(rng.choice([500, 1000, 2000, 3000]))}

    def loan(rng, db, key, owner):
        return {"loan_id": key, "client_id": owner["client_id"], "product": rng.choice(["personal", "auto", "mortgage"]),
                "balance": money(rng, 500, 50000), "status": rng.choice(["active", "active", "active", "paid_off"])}

    def beneficiary(rng, db, key, owner):
        return {"beneficiary_id": key, "client_id": owner["client_id"], "name": person(rng)[0],
                "iban": f"US{digits(rng, 2)}BANK{digits(rng, 10)}", "status": rng.choice(["pending", "verified"])}

    return {"clients": client, "accounts": owned(account), "cards": owned(card), "loans": owned(loan),
            "beneficiaries": owned(beneficiary)}


BANK = DomainTemplate(
    name="bank",
    subjects=("card security", "account access", "loan repayment", "payees", "spending limits", "deposits"),
    data_model={"tables": {
        "clients": {"description": "bank clients", "key": "client_id", "key_prefix": "CL", "fields": {
            "client_id": S("client id"), "name": S("full name"), "email": S("email address", unique=True),
            "phone": S("phone number"), "status": S("client status", enum=["active", "restricted"])}},
        "accounts": {"description": "deposit accounts", "key": "account_id", "key_prefix": "AC", "fields": {
            "account_id": S("account id"), "client_id": S("owner", ref="clients"),
            "kind": S("account kind", enum=["checking", "savings"]), "last_four": S("last four digits"),
            "balance": N("current balance in USD", minimum=0), "status": S("status", enum=["active", "frozen", "closed"])}},
        "cards": {"description": "debit cards", "key": "card_id", "key_prefix": "CD", "fields": {
            "card_id": S("card id"), "client_id": S("owner", ref="clients"), "account_id": S("linked account", ref="accounts"),
            "last_four": S("last four digits"), "status": S("status", enum=["active", "blocked"]),
            "daily_limit": N("daily spending limit in USD", minimum=0, maximum=10000)}},
        "loans": {"description": "loans", "key": "loan_id", "key_prefix": "LN", "fields": {
            "loan_id": S("loan id"), "client_id": S("borrower", ref="clients"),
            "product": S("loan product", enum=["personal", "auto", "mortgage"]),
            "balance": N("outstanding balance in USD", minimum=0), "status": S("status", enum=["active", "paid_off"])}},
        "beneficiaries": {"description": "payees a client may send money to", "key": "beneficiary_id",
                          "key_prefix": "BF", "fields": {
            "beneficiary_id": S("beneficiary id"), "client_id": S("owner", ref="clients"), "name": S("payee name"),
            "iban": S("payee IBAN", unique=True), "status": S("verification status", enum=["pending", "verified"])}},
    }},
    user_table="clients", owner_field="client_id",
    labels={"clients": "name", "accounts": "last_four", "cards": "last_four", "loans": "product", "beneficiaries": "name"},
    lookups=(("accounts", "balance"), ("accounts", "status"), ("loans", "balance"), ("cards", "daily_limit"),
             ("beneficiaries", "status")),
    factories=_bank_factories(),
    entity={"clients": "client", "accounts": "account", "cards": "card", "loans": "loan", "beneficiaries": "beneficiary"},
    writes=(
        WriteTemplate(_update("block_card", "cards", "card_id", "Block an active card.",
                              [{"field": "status", "op": "eq", "value": "active"}],
                              [{"field": "status", "value": "blocked"}]),
                      "Please block my card ending in {label}, I lost it."),
        WriteTemplate(_update("unblock_card", "cards", "card_id", "Unblock a blocked card.",
                              [{"field": "status", "op": "eq", "value": "blocked"}],
                              [{"field": "status", "value": "active"}]),
                      "I found my card ending in {label}; please unblock it."),
        WriteTemplate(_update("set_card_daily_limit", "cards", "card_id", "Change the daily limit of an active card.",
                              [{"field": "status", "op": "eq", "value": "active"}],
                              [{"field": "daily_limit", "param": "daily_limit"}],
                              {"daily_limit": N("new daily limit in USD")}),
                      "Set the daily limit of my card ending in {label} to {daily_limit} dollars.",
                      lambda rng, db, r: {"daily_limit": float(rng.choice([250, 750, 1500, 2500, 4000]))}),
        WriteTemplate(_update("freeze_account", "accounts", "account_id", "Freeze an active account.",
                              [{"field": "status", "op": "eq", "value": "active"}],
                              [{"field": "status", "value": "frozen"}]),
                      "Freeze my {kind} account ending in {label} right away."),
        WriteTemplate(_update("unfreeze_account", "accounts", "account_id", "Unfreeze a frozen account.",
                              [{"field": "status", "op": "eq", "value": "frozen"}],
                              [{"field": "status", "value": "active"}]),
                      "Please unfreeze my {kind} account ending in {label}."),
        WriteTemplate(_update("withdraw", "accounts", "account_id", "Withdraw cash from an active account.",
                              [{"field": "status", "op": "eq", "value": "active"}],
                              [{"field": "balance", "add_param": "amount", "sign": -1}], {"amount": N("amount in USD")}),
                      "I want to withdraw {amount} dollars from my {kind} account ending in {label}.",
                      lambda rng, db, r: {"amount": money(rng, 20, 3000)}),
        WriteTemplate(_update("pay_loan", "loans", "loan_id", "Pay towards an active loan.",
                              [{"field": "status", "op": "eq", "value": "active"}],
                              [{"field": "balance", "add_param": "amount", "sign": -1}], {"amount": N("amount in USD")}),
                      "I'd like to pay {amount} dollars towards my {label} loan.",
                      lambda rng, db, r: {"amount": money(rng, 50, 2000)}),
        WriteTemplate(_update("verify_beneficiary", "beneficiaries", "beneficiary_id", "Mark a pending payee verified.",
                              [{"field": "status", "op": "eq", "value": "pending"}],
                              [{"field": "status", "value": "verified"}]),
                      "Please verify my payee {label}; I confirmed their details."),
        WriteTemplate({"name": "add_beneficiary", "description": "Add a new payee (pending verification).",
                       "kind": "create", "table": "beneficiaries",
                       "parameters": {"client_id": S("owner client id"), "name": S("payee name"), "iban": S("payee IBAN")},
                       "effects": [{"field": "client_id", "param": "client_id"}, {"field": "name", "param": "name"},
                                   {"field": "iban", "param": "iban"}, {"field": "status", "value": "pending"}]},
                      "Add {name} as a new payee, IBAN {iban}.",
                      lambda rng, db, u: {"name": person(rng)[0], "iban": f"US{digits(rng, 2)}BANK{digits(rng, 10)}"}),
    ),
)


# ------------------------------------------------------------------------------------------------ library


def _library_factories():
    def member(rng, db, key):
        name, email = person(rng)
        return {"member_id": key, "name": name, "email": email, "status": rng.choice(["active", "active", "suspended"]),
                "fines": rng.choice([0.0, 0.0, money(rng, 0.5, 40)])}

    def book(rng, db, key):
        return {"book_id": key, "title": "The {} {}".format(*rng.sample(WORDS, 2)),
                "author": person(rng)[0], "genre": rng.choice(["fiction", "history", "science", "poetry"]),
                "copies_available": rng.randint(0, 4)}

    def loan(rng, db, key):
        owner, item = pick(rng, db["members"]), pick(rng, db["books"])
        if owner is None or item is None:
            return None
        return {"loan_id": key, "member_id": owner["member_id"], "book_id": item["book_id"], "book_title": item["title"],
                "due_date": date(rng), "renewals": rng.randint(0, 3),
                "status": rng.choice(["borrowed", "borrowed", "returned", "lost"])}

    def hold(rng, db, key):
        owner, item = pick(rng, db["members"]), pick(rng, db["books"])
        if owner is None or item is None:
            return None
        return {"hold_id": key, "member_id": owner["member_id"], "book_id": item["book_id"], "book_title": item["title"],
                "status": rng.choice(["waiting", "waiting", "ready", "cancelled"])}

    return {"members": member, "books": book, "loans": loan, "holds": hold}


def _new_hold_args(rng, db, user):
    item = pick(rng, db["books"])
    return {"book_id": item["book_id"], "book_title": item["title"]} if item else {}


LIBRARY = DomainTemplate(
    name="library",
    subjects=("renewals", "lost books", "holds", "fines", "due dates", "membership"),
    data_model={"tables": {
        "members": {"description": "library members", "key": "member_id", "key_prefix": "MB", "fields": {
            "member_id": S("member id"), "name": S("full name"), "email": S("email address", unique=True),
            "status": S("membership status", enum=["active", "suspended"]), "fines": N("unpaid fines in USD", minimum=0)}},
        "books": {"description": "catalogue titles", "key": "book_id", "key_prefix": "BK", "fields": {
            "book_id": S("book id"), "title": S("title"), "author": S("author"),
            "genre": S("genre", enum=["fiction", "history", "science", "poetry"]),
            "copies_available": I("copies on the shelf", minimum=0)}},
        "loans": {"description": "books lent to members", "key": "loan_id", "key_prefix": "LN", "fields": {
            "loan_id": S("loan id"), "member_id": S("borrower", ref="members"), "book_id": S("book", ref="books"),
            "book_title": S("title of the book"), "due_date": S("due date (YYYY-MM-DD)"),
            "renewals": I("renewals so far", minimum=0, maximum=3),
            "status": S("status", enum=["borrowed", "returned", "lost"])}},
        "holds": {"description": "reservations of books", "key": "hold_id", "key_prefix": "HD", "fields": {
            "hold_id": S("hold id"), "member_id": S("member", ref="members"), "book_id": S("book", ref="books"),
            "book_title": S("title of the book"), "status": S("status", enum=["waiting", "ready", "cancelled"])}},
    }},
    user_table="members", owner_field="member_id",
    labels={"members": "name", "loans": "book_title", "holds": "book_title", "books": "title"},
    lookups=(("loans", "due_date"), ("loans", "renewals"), ("holds", "status"), ("members", "fines")),
    factories=_library_factories(),
    entity={"members": "member", "books": "book", "loans": "loan", "holds": "hold"},
    writes=(
        WriteTemplate(_update("renew_loan", "loans", "loan_id", "Renew a borrowed book (at most 3 renewals).",
                              [{"field": "status", "op": "eq", "value": "borrowed"}],
                              [{"field": "renewals", "add_value": 1}, {"field": "due_date", "param": "due_date"}],
                              {"due_date": S("new due date (YYYY-MM-DD)")}),
                      "Please renew '{label}' until {due_date}.", lambda rng, db, r: {"due_date": date(rng, 2026)}),
        WriteTemplate(_update("return_book", "loans", "loan_id", "Record a borrowed book as returned.",
                              [{"field": "status", "op": "eq", "value": "borrowed"}],
                              [{"field": "status", "value": "returned"}]),
                      "I dropped '{label}' in the return box; please check it in."),
        WriteTemplate(_update("report_lost", "loans", "loan_id", "Report a borrowed book lost.",
                              [{"field": "status", "op": "eq", "value": "borrowed"}],
                              [{"field": "status", "value": "lost"}]),
                      "I'm afraid I lost '{label}'. Please report it."),
        WriteTemplate(_update("cancel_hold", "holds", "hold_id", "Cancel a waiting hold.",
                              [{"field": "status", "op": "eq", "value": "waiting"}],
                              [{"field": "status", "value": "cancelled"}]),
                      "Cancel my hold on '{label}', I don't need it anymore."),
        WriteTemplate(_update("pay_fine", "members", "member_id", "Pay part or all of a member's fines.", [],
                              [{"field": "fines", "add_param": "amount", "sign": -1}], {"amount": N("amount in USD")}),
                      "I want to pay {amount} dollars of my fines.",
                      lambda rng, db, r: {"amount": round(min(r["fines"], money(rng, 1, 40)), 2)}),
        WriteTemplate({"name": "place_hold", "description": "Reserve a book for a member.", "kind": "create",
                       "table": "holds", "parameters": {"member_id": S("member id"), "book_id": S("book id"),
                                                        "book_title": S("title of the book")},
                       "effects": [{"field": "member_id", "param": "member_id"}, {"field": "book_id", "param": "book_id"},
                                   {"field": "book_title", "param": "book_title"}, {"field": "status", "value": "waiting"}]},
                      "Please put a hold on '{book_title}' (book id {book_id}) for me.", _new_hold_args),
    ),
)


# ------------------------------------------------------------------------------------------------ clinic


def _clinic_factories():
    def patient(rng, db, key):
        name, email = person(rng)
        return {"patient_id": key, "name": name, "email": email, "insurance": rng.choice(["none", "basic", "premium"])}

    def doctor(rng, db, key):
        return {"doctor_id": key, "name": "Dr. " + rng.choice(LAST),
                "specialty": rng.choice(["general", "cardiology", "dermatology", "pediatrics"])}

    def appointment(rng, db, key):
        owner, doc = pick(rng, db["patients"]), pick(rng, db["doctors"])
        if owner is None or doc is None:
            return None
        return {"appointment_id": key, "patient_id": owner["patient_id"], "doctor_id": doc["doctor_id"],
                "doctor_name": doc["name"], "date": date(rng),
                "status": rng.choice(["scheduled", "scheduled", "completed", "cancelled"])}

    def prescription(rng, db, key):
        owner = pick(rng, db["patients"])
        if owner is None:
            return None
        return {"rx_id": key, "patient_id": owner["patient_id"],
                "drug": rng.choice(["amoxicillin", "lisinopril", "metformin", "atorvastatin", "ibuprofen"]),
                "refills_left": rng.randint(0, 3), "status": rng.choice(["active", "active", "expired"])}

    return {"patients": patient, "doctors": doctor, "appointments": appointment, "prescriptions": prescription}


def _new_appointment_args(rng, db, user):
    doc = pick(rng, db["doctors"])
    return {"doctor_id": doc["doctor_id"], "doctor_name": doc["name"], "date": date(rng, 2026)} if doc else {}


CLINIC = DomainTemplate(
    name="clinic",
    subjects=("appointments", "prescriptions", "insurance", "rescheduling", "specialists"),
    data_model={"tables": {
        "patients": {"description": "registered patients", "key": "patient_id", "key_prefix": "PT", "fields": {
            "patient_id": S("patient id"), "name": S("full name"), "email": S("email address", unique=True),
            "insurance": S("insurance plan", enum=["none", "basic", "premium"])}},
        "doctors": {"description": "clinic doctors", "key": "doctor_id", "key_prefix": "DR", "fields": {
            "doctor_id": S("doctor id"), "name": S("doctor name"),
            "specialty": S("specialty", enum=["general", "cardiology", "dermatology", "pediatrics"])}},
        "appointments": {"description": "visits", "key": "appointment_id", "key_prefix": "AP", "fields": {
            "appointment_id": S("appointment id"), "patient_id": S("patient", ref="patients"),
            "doctor_id": S("doctor", ref="doctors"), "doctor_name": S("doctor name"), "date": S("date (YYYY-MM-DD)"),
            "status": S("status", enum=["scheduled", "completed", "cancelled"])}},
        "prescriptions": {"description": "medication prescriptions", "key": "rx_id", "key_prefix": "RX", "fields": {
            "rx_id": S("prescription id"), "patient_id": S("patient", ref="patients"), "drug": S("drug name"),
            "refills_left": I("refills remaining", minimum=0), "status": S("status", enum=["active", "expired"])}},
    }},
    user_table="patients", owner_field="patient_id",
    labels={"patients": "name", "appointments": "doctor_name", "prescriptions": "drug", "doctors": "name"},
    lookups=(("appointments", "date"), ("appointments", "status"), ("prescriptions", "refills_left"),
             ("patients", "insurance")),
    factories=_clinic_factories(),
    entity={"patients": "patient", "doctors": "doctor", "appointments": "appointment", "prescriptions": "prescription"},
    writes=(
        WriteTemplate(_update("cancel_appointment", "appointments", "appointment_id", "Cancel a scheduled appointment.",
                              [{"field": "status", "op": "eq", "value": "scheduled"}],
                              [{"field": "status", "value": "cancelled"}]),
                      "Please cancel my appointment with {label} on {date}."),
        WriteTemplate(_update("reschedule_appointment", "appointments", "appointment_id",
                              "Move a scheduled appointment to a new date.",
                              [{"field": "status", "op": "eq", "value": "scheduled"}],
                              [{"field": "date", "param": "new_date"}], {"new_date": S("new date (YYYY-MM-DD)")}),
                      "Move my appointment with {label} on {date} to {new_date}.",
                      lambda rng, db, r: {"new_date": date(rng, 2026)}),
        WriteTemplate(_update("refill_prescription", "prescriptions", "rx_id", "Use one refill of an active prescription.",
                              [{"field": "status", "op": "eq", "value": "active"}],
                              [{"field": "refills_left", "add_value": 1, "sign": -1}]),
                      "I need a refill of my {label} prescription."),
        WriteTemplate(_update("update_insurance", "patients", "patient_id", "Change a patient's insurance plan.", [],
                              [{"field": "insurance", "param": "insurance"}],
                              {"insurance": S("insurance plan", enum=["none", "basic", "premium"])}),
                      "My insurance plan changed to {insurance}; please update my file.",
                      lambda rng, db, r: {"insurance": rng.choice(["none", "basic", "premium"])}),
        WriteTemplate({"name": "book_appointment", "description": "Book a new appointment.", "kind": "create",
                       "table": "appointments",
                       "parameters": {"patient_id": S("patient id"), "doctor_id": S("doctor id"),
                                      "doctor_name": S("doctor name"), "date": S("date (YYYY-MM-DD)")},
                       "effects": [{"field": "patient_id", "param": "patient_id"}, {"field": "doctor_id", "param": "doctor_id"},
                                   {"field": "doctor_name", "param": "doctor_name"}, {"field": "date", "param": "date"},
                                   {"field": "status", "value": "scheduled"}]},
                      "Book me an appointment with {doctor_name} (doctor id {doctor_id}) on {date}.",
                      _new_appointment_args),
    ),
)

TEMPLATES: dict[str, DomainTemplate] = {t.name: t for t in (BANK, LIBRARY, CLINIC)}
