"""Customers (scope ``finance`` or ``admin``): a keyset-paginated list, and one customer with
their subscriptions, the card on file and the credit balance."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from billing.api.auth import require_scope
from billing.api.dependencies import get_deps
from billing.api.schemas import (
    ID_PATTERN,
    BalanceOut,
    CardOut,
    CustomerListOut,
    CustomerOut,
    CustomerSummaryOut,
    SubscriptionSummaryOut,
    error_responses,
)
from billing.api.subscriptions import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    _refuse_unknown_params,
)
from billing.errors import NotFound
from billing.finance import amount_display
from billing.subscription import SubscriptionStatus
from billing.worker import Dependencies
from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from db.repositories import customers as customers_repo
from db.repositories import subscriptions as subscriptions_repo

router = APIRouter(
    prefix="/v1/customers",
    tags=["customers"],
    dependencies=[require_scope("finance", "admin")],
)

CustomerId = Annotated[
    str,
    Path(min_length=1, max_length=40, pattern=ID_PATTERN, description="Customer id, 'cus_...'."),
]


@router.get(
    "",
    responses=error_responses(401, 403, 422, 503),
    summary="List customers",
)
async def list_customers(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[
        str | None,
        Query(max_length=40, pattern=ID_PATTERN, description="next_cursor of the previous page."),
    ] = None,
) -> CustomerListOut:
    """Customers by id."""
    _refuse_unknown_params(request, frozenset({"limit", "cursor"}))

    def read() -> CustomerListOut:
        with unit_of_work(deps.session_factory) as session:
            records = customers_repo.list_customers(session, limit=limit + 1, after_id=cursor)
        page = records[:limit]
        return CustomerListOut(
            items=[CustomerSummaryOut.of(c) for c in page],
            next_cursor=page[-1].id if len(records) > limit else None,
        )

    return await asyncio.to_thread(read)


@router.get(
    "/{id}",
    responses=error_responses(401, 403, 404, 422, 503),
    summary="A customer, with subscriptions, card and credit balance",
)
async def get_customer(
    id: CustomerId, deps: Annotated[Dependencies, Depends(get_deps)]
) -> CustomerOut:
    def read() -> CustomerOut:
        with unit_of_work(deps.session_factory) as session:
            customer = customers_repo.get_customer(session, id)
            if customer is None:
                raise NotFound(f"customer {id!r} not found", field="id")
            subscriptions = subscriptions_repo.list_subscriptions_for_customer(session, id)
            parked = subscriptions_repo.parked_at(
                session,
                [s.id for s in subscriptions if s.status == SubscriptionStatus.NEEDS_ATTENTION],
            )
            balances = balances_repo.credit_balances(session, id)
        card = (
            None
            if customer.default_payment_method_id is None
            else CardOut(
                payment_method_id=customer.default_payment_method_id,
                brand=customer.default_card_brand,
                last4=customer.default_card_last4,
            )
        )
        summary = CustomerSummaryOut.of(customer)
        return CustomerOut(
            **summary.model_dump(),
            card=card,
            credit_balance=[
                BalanceOut(
                    currency=currency,
                    amount_minor=amount,
                    amount_display=amount_display(amount, currency),
                )
                for currency, amount in balances.items()
            ],
            subscriptions=[SubscriptionSummaryOut.of(s, parked.get(s.id)) for s in subscriptions],
        )

    return await asyncio.to_thread(read)
