"""The TweetBot trainer: the scrape, train and publish stages that the operator's Jobs run."""
