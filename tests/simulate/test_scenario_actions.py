"""The scenario actions the fuzzer needs, each through the product's real path: the customer's
3-D Secure step at localstripe and its payment_intent.succeeded through the webhook endpoint;
a card the bank reports stolen; a card changed at the provider whose customer.updated arrives
late, twice or out of order; stolen and lost cards refused at attach."""

from __future__ import annotations

from billing.testing.plugin import ScenarioRunner

AUTHENTICATE = """\
start: 2032-03-01T09:00
subscriptions:
  - plan: basic-monthly
timeline:
  - at: 2032-03-20
    action: card_needs_authentication
  - at: 2032-04-02
    action: authenticate
    webhook_delay_minutes: 90
    webhook_redelivery_minutes: 600
horizon: 2032-04-15
"""


def test_authentication_pays_the_waiting_payment_through_the_webhook(
    run_scenario: ScenarioRunner,
) -> None:
    timeline = run_scenario(AUTHENTICATE)
    invoice = timeline.subscription().invoice("INV-0002")
    # The payment that waited for the customer is the one that pays: no new attempt.
    assert [(a.number, a.reason) for a in invoice.attempts] == [(1, "scheduled")]
    assert invoice.status == "paid"
    webhooks = [
        (a.at.strftime("%d %H:%M"), a.detail) for a in timeline.actions if a.action == "webhook"
    ]
    assert webhooks == [
        ("02 01:30", "payment_intent.succeeded of timeline[1]: routed"),
        ("02 10:00", "payment_intent.succeeded of timeline[1], again: duplicate"),
    ]
    # Paid when the (late) news arrived, not when the customer authenticated.
    recovered = [n for n in timeline.subscription().notices if n.kind == "payment_recovered"]
    assert [n.at.strftime("%d %H:%M") for n in recovered] == ["02 01:30"]


def test_a_failed_authentication_sends_no_webhook_and_leaves_the_invoice_open(
    run_scenario: ScenarioRunner,
) -> None:
    timeline = run_scenario(
        AUTHENTICATE.replace("action: authenticate\n", "action: authenticate\n    success: false\n")
    )
    [auth] = [a for a in timeline.actions if a.action == "authenticate"]
    assert auth.outcome == "applied"
    assert "authentication failed" in auth.detail
    assert not [a for a in timeline.actions if a.action == "webhook"]
    assert timeline.subscription().invoice("INV-0002").status == "open"


def test_authenticate_without_a_waiting_payment_is_refused(run_scenario: ScenarioRunner) -> None:
    timeline = run_scenario(
        AUTHENTICATE.replace("action: card_needs_authentication", "action: card_recovers")
    )
    [auth] = [a for a in timeline.actions if a.action == "authenticate"]
    assert (auth.outcome, auth.detail) == ("refused", "no payment waits for authentication")


def test_a_card_reported_stolen_is_a_hard_decline_not_retried(run_scenario: ScenarioRunner) -> None:
    timeline = run_scenario(
        """\
start: 2032-03-01T09:00
subscriptions:
  - plan: basic-monthly
timeline:
  - at: 2032-03-20
    action: card_reported_stolen
  - at: 2032-04-06
    action: update_card
    card: stolen
horizon: 2032-04-10
"""
    )
    invoice = timeline.subscription().invoice("INV-0002")
    assert [(a.number, a.decline_code) for a in invoice.attempts] == [(1, "stolen_card")]
    update = next(a for a in timeline.actions if a.action == "update_card")
    assert update.outcome == "refused"  # the provider declines the stolen card at attach


def test_card_news_delivered_out_of_order_keeps_the_newer_card(
    run_scenario: ScenarioRunner,
) -> None:
    timeline = run_scenario(
        """\
start: 2032-03-01T09:00
subscriptions:
  - plan: basic-monthly
timeline:
  - at: 2032-03-20T10:00
    action: change_card_at_provider
    card: declines
    webhook_delay_minutes: 120
  - at: 2032-03-20T11:00
    action: change_card_at_provider
    card: succeeds
horizon: 2032-04-02
"""
    )
    webhooks = [a.detail for a in timeline.actions if a.action == "webhook"]
    assert webhooks == [
        "customer.updated of timeline[1]: routed",
        "customer.updated of timeline[0]: ignored",  # older news, delivered later: stale
    ]
    assert timeline.subscription().invoice("INV-0002").status == "paid"
