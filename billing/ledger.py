"""The ledger, mirrored from Stripe's balance transactions, and payout reconciliation, as pure
rules.

Every money movement on the Stripe account is a balance transaction
(https://docs.stripe.com/api/balance_transactions/object): a charge (gross ``amount``, ``fee``,
``net``), a refund, a dispute's withdrawal and its reversal (``adjustment``, reporting category
``dispute`` / ``dispute_reversal``), a payout, and others. The ledger keeps one entry per
transaction, keyed by its id, in the account's settlement currency, with the exchange rate when
the charge was in another currency. Entries are only ever added: importing twice adds nothing,
and Stripe's own corrections arrive as new transactions.

A payout (https://docs.stripe.com/payouts/reconciliation) pays out a set of transactions; each
is matched to our payments, refunds and disputes, and every difference is a finding.
Amounts are integer minor units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from billing.charge_reconciliation import ProviderCharge
    from billing.payments import PaymentIntentCancellation


@dataclass(frozen=True, slots=True)
class ProviderBalanceTransaction:
    """One balance transaction as Stripe reports it (settlement currency, minor units)."""

    transaction_id: str
    type: str
    reporting_category: str | None
    amount_minor: int
    fee_minor: int
    net_minor: int
    currency: str
    #: The charge, refund, dispute or payout it belongs to (``ch_``, ``re_``, ``dp_``, ``po_``).
    source_id: str | None
    #: Stripe's exchange rate when the source's currency differs (its text, exactly).
    exchange_rate: str | None = None
    created: datetime | None = None
    available_on: datetime | None = None
    description: str | None = None


class PayoutStatus(StrEnum):
    PENDING = "pending"
    IN_TRANSIT = "in_transit"
    PAID = "paid"
    FAILED = "failed"
    CANCELED = "canceled"


@dataclass(frozen=True, slots=True)
class ProviderPayout:
    payout_id: str
    amount_minor: int
    currency: str
    status: PayoutStatus
    automatic: bool
    balance_transaction_id: str | None
    arrival_date: datetime | None = None
    created: datetime | None = None
    failure_code: str | None = None


class FindingKind(StrEnum):
    #: At Stripe, in a payout, but no payment, refund or dispute of ours.
    UNKNOWN_AT_STRIPE = "unknown_at_stripe"
    #: Ours (a settled payment, a refund), but in no payout after the expected delay.
    MISSING_FROM_PAYOUTS = "missing_from_payouts"
    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    FEE_MISMATCH = "fee_mismatch"
    #: The payout's amount is not the net of what it paid out.
    PAYOUT_TOTAL_MISMATCH = "payout_total_mismatch"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


#: How serious each difference is: money we cannot account for is an error; a fee that is
#: not what we recorded, a warning.
SEVERITY: dict[FindingKind, Severity] = {
    FindingKind.UNKNOWN_AT_STRIPE: Severity.ERROR,
    FindingKind.MISSING_FROM_PAYOUTS: Severity.WARNING,
    FindingKind.AMOUNT_MISMATCH: Severity.ERROR,
    FindingKind.CURRENCY_MISMATCH: Severity.ERROR,
    FindingKind.FEE_MISMATCH: Severity.WARNING,
    FindingKind.PAYOUT_TOTAL_MISMATCH: Severity.ERROR,
}


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    detail: str
    transaction_id: str | None = None
    source_id: str | None = None
    #: Our record it concerns (a payment, refund or dispute id).
    ours: str | None = None

    @property
    def severity(self) -> Severity:
        return SEVERITY[self.kind]


@dataclass(frozen=True, slots=True)
class Expected:
    """What our records say a balance transaction should hold (settlement currency when known,
    else the charge's own). ``fee_minor`` None: we recorded no fee to compare."""

    ours: str
    amount_minor: int
    currency: str
    fee_minor: int | None = None


@dataclass
class PayoutReconciliation:
    payout_id: str
    currency: str
    amount_minor: int
    matched: list[tuple[str, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    gross_minor: int = 0
    fee_minor: int = 0
    net_minor: int = 0
    #: Transactions of each type it paid out.
    counts_by_type: dict[str, int] = field(default_factory=dict)


def reconcile_payout(
    payout: ProviderPayout,
    transactions: list[ProviderBalanceTransaction],
    expected: dict[str, Expected],
) -> PayoutReconciliation:
    """Match a payout's transactions to ``expected`` (by source id: ``ch_``, ``re_``, ``dp_``
    plus a ``#reversal`` suffix for a dispute's reinstatement) and list every difference."""
    report = PayoutReconciliation(payout.payout_id, payout.currency, payout.amount_minor)
    paid_out = 0
    for txn in transactions:
        report.counts_by_type[txn.type] = report.counts_by_type.get(txn.type, 0) + 1
        if txn.type == "payout":
            continue
        report.gross_minor += txn.amount_minor
        report.fee_minor += txn.fee_minor
        report.net_minor += txn.net_minor
        paid_out += txn.net_minor
        key = expectation_key(txn)
        want = expected.get(key) if key is not None else None
        if want is None:
            report.findings.append(
                Finding(
                    FindingKind.UNKNOWN_AT_STRIPE,
                    f"{txn.type} {txn.transaction_id} ({txn.source_id or 'no source'}) of "
                    f"{txn.amount_minor} {txn.currency} is in payout {payout.payout_id} but "
                    "is none of our payments, refunds or disputes",
                    txn.transaction_id,
                    txn.source_id,
                )
            )
            continue
        problems = _compare(txn, want)
        report.findings.extend(problems)
        if not problems:
            report.matched.append((txn.transaction_id, want.ours))
    if paid_out != payout.amount_minor:
        report.findings.append(
            Finding(
                FindingKind.PAYOUT_TOTAL_MISMATCH,
                f"payout {payout.payout_id} is {payout.amount_minor} {payout.currency} but the "
                f"transactions it paid out net {paid_out}",
                payout.balance_transaction_id,
                payout.payout_id,
            )
        )
    return report


def expectation_key(txn: ProviderBalanceTransaction) -> str | None:
    """How a transaction is looked up among our records: its source id, and for a dispute's
    reinstatement the dispute id with ``#reversal``."""
    if txn.source_id is None:
        return None
    if txn.reporting_category == "dispute_reversal":
        return f"{txn.source_id}#reversal"
    return txn.source_id


def _compare(txn: ProviderBalanceTransaction, want: Expected) -> list[Finding]:
    found = []
    if txn.currency.upper() != want.currency.upper():
        if txn.exchange_rate is None:
            found.append(
                Finding(
                    FindingKind.CURRENCY_MISMATCH,
                    f"{txn.transaction_id} is in {txn.currency.upper()}, our {want.ours} in "
                    f"{want.currency.upper()}, with no exchange rate",
                    txn.transaction_id,
                    txn.source_id,
                    want.ours,
                )
            )
        return found  # converted: amounts are not comparable here
    if txn.amount_minor != want.amount_minor:
        found.append(
            Finding(
                FindingKind.AMOUNT_MISMATCH,
                f"{txn.transaction_id} is {txn.amount_minor} {txn.currency.upper()}, our "
                f"{want.ours} {want.amount_minor}",
                txn.transaction_id,
                txn.source_id,
                want.ours,
            )
        )
    if want.fee_minor is not None and txn.fee_minor != want.fee_minor:
        found.append(
            Finding(
                FindingKind.FEE_MISMATCH,
                f"{txn.transaction_id} has a fee of {txn.fee_minor} {txn.currency.upper()}, our "
                f"{want.ours} recorded {want.fee_minor}",
                txn.transaction_id,
                txn.source_id,
                want.ours,
            )
        )
    return found


class LedgerGateway(Protocol):
    """Reads of the provider's balance transactions and payouts (``StripeGateway``)."""

    def retrieve_balance_transaction(
        self, *, transaction_id: str
    ) -> ProviderBalanceTransaction: ...

    def list_balance_transactions(
        self, *, payout_id: str | None = None, created_from: datetime | None = None
    ) -> list[ProviderBalanceTransaction]:
        """Every page: those a payout paid out (``payout``), or created since a time."""
        ...

    def retrieve_payout(self, *, payout_id: str) -> ProviderPayout: ...

    def list_payouts(self, *, created_from: datetime | None = None) -> list[ProviderPayout]: ...

    def list_charges(self, *, created_from: datetime) -> list[ProviderCharge]:
        """The account's charges created since ``created_from``, every page."""
        ...

    def payment_intent_status(self, *, payment_intent_id: str) -> str:
        """The PaymentIntent's status as Stripe reports it (``requires_payment_method``,
        ``canceled``, ``succeeded``, ...)."""
        ...

    def cancel_payment_intent(self, *, payment_intent_id: str) -> PaymentIntentCancellation:
        """Cancel it so nobody can pay it (idempotent; a succeeded one is returned paid)."""
        ...


@dataclass
class PeriodReconciliation:
    """Every payout created in ``[since, until)`` reconciled, plus our money movements of the
    period that no payout paid out after the expected delay."""

    since: datetime | None
    until: datetime
    payouts: list[PayoutReconciliation]
    missing: list[Finding]

    @property
    def findings(self) -> list[Finding]:
        return [f for report in self.payouts for f in report.findings] + self.missing

    def totals(self) -> dict[str, dict[str, int]]:
        """Per settlement currency: gross, fee, net and paid out (minor units)."""
        found: dict[str, dict[str, int]] = {}
        for report in self.payouts:
            sums = found.setdefault(
                report.currency,
                {"gross_minor": 0, "fee_minor": 0, "net_minor": 0, "paid_out_minor": 0},
            )
            sums["gross_minor"] += report.gross_minor
            sums["fee_minor"] += report.fee_minor
            sums["net_minor"] += report.net_minor
            sums["paid_out_minor"] += report.amount_minor
        return found
