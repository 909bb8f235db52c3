# The billing service image: `billing worker`, `billing api` and `billing migrate`.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY billing ./billing
COPY workflows ./workflows
COPY activities ./activities
COPY db ./db
RUN pip install --no-cache-dir ".[postgres]"
RUN useradd --create-home billing
USER billing
EXPOSE 8000
CMD ["billing", "api"]
