/* The part of OpenSSL 3's API that fastmfd's TLS transport (_tls.pxi) uses.
 *
 * When the development headers are installed (libssl-dev) they are used as
 * they are. Otherwise -- or when FASTMFD_NO_OPENSSL_HEADERS is defined, which
 * is how this fallback is tested -- the declarations below, copied from the
 * OpenSSL 3.0 ABI, let the core link against the runtime libraries
 * (libssl.so.3, libcrypto.so.3) that every Debian-like base system ships.
 * Macros of the real headers are written out as the SSL_CTX_ctrl / SSL_ctrl
 * calls they expand to, with the same numeric constants. */
#ifndef FASTMFD_OPENSSL_STABLE_H
#define FASTMFD_OPENSSL_STABLE_H

#if !defined(FASTMFD_NO_OPENSSL_HEADERS) && defined(__has_include)
#  if __has_include(<openssl/ssl.h>) && __has_include(<openssl/err.h>) \
      && __has_include(<openssl/x509v3.h>)
#    include <openssl/ssl.h>
#    include <openssl/err.h>
#    include <openssl/x509v3.h>
#    define FASTMFD_HAVE_OPENSSL_H 1
#  endif
#endif

#ifndef FASTMFD_HAVE_OPENSSL_H
#include <stddef.h>
#include <stdint.h>

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
typedef struct ssl_cipher_st SSL_CIPHER;
typedef struct bio_st BIO;
typedef struct x509_st X509;
typedef struct X509_name_st X509_NAME;
typedef struct X509_name_entry_st X509_NAME_ENTRY;
typedef struct X509_VERIFY_PARAM_st X509_VERIFY_PARAM;
typedef struct x509_store_ctx_st X509_STORE_CTX;
typedef struct asn1_string_st ASN1_STRING;
typedef struct GENERAL_NAME_st GENERAL_NAME;
typedef struct stack_st OPENSSL_STACK;
typedef struct stack_st_GENERAL_NAME GENERAL_NAMES;
struct stack_st_X509_NAME;
typedef int (*SSL_verify_cb)(int preverify_ok, X509_STORE_CTX *x509_ctx);

#define TLS1_2_VERSION 0x0303
#define TLS1_3_VERSION 0x0304

#define SSL_FILETYPE_PEM 1
#define SSL_VERIFY_NONE 0x00
#define SSL_VERIFY_PEER 0x01
#define SSL_VERIFY_FAIL_IF_NO_PEER_CERT 0x02

#define SSL_ERROR_NONE 0
#define SSL_ERROR_SSL 1
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_SYSCALL 5
#define SSL_ERROR_ZERO_RETURN 6

#define SSL_OP_IGNORE_UNEXPECTED_EOF ((uint64_t)1 << 7)
#define SSL_OP_NO_COMPRESSION ((uint64_t)1 << 17)
#define SSL_OP_NO_RENEGOTIATION ((uint64_t)1 << 30)

#define SSL_MODE_ENABLE_PARTIAL_WRITE 0x00000001U
#define SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER 0x00000002U
#define SSL_MODE_AUTO_RETRY 0x00000004U

#define X509_V_OK 0
#define X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS 0x4
#define NID_commonName 13
#define NID_subject_alt_name 85
#define GEN_EMAIL 1
#define GEN_DNS 2
#define GEN_IPADD 7

#define SSL_CTRL_MODE 33
#define SSL_CTRL_SET_READ_AHEAD 41
#define SSL_CTRL_SET_TLSEXT_HOSTNAME 55
#define SSL_CTRL_SET_MIN_PROTO_VERSION 123
#define SSL_CTRL_SET_MAX_PROTO_VERSION 124
#define TLSEXT_NAMETYPE_host_name 0

long SSL_CTX_ctrl(SSL_CTX *ctx, int cmd, long larg, void *parg);
long SSL_ctrl(SSL *ssl, int cmd, long larg, void *parg);

#define SSL_CTX_set_min_proto_version(ctx, version) \
    SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, version, NULL)
#define SSL_CTX_set_max_proto_version(ctx, version) \
    SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MAX_PROTO_VERSION, version, NULL)
#define SSL_CTX_set_mode(ctx, op) SSL_CTX_ctrl((ctx), SSL_CTRL_MODE, (op), NULL)
#define SSL_CTX_set_read_ahead(ctx, m) SSL_CTX_ctrl((ctx), SSL_CTRL_SET_READ_AHEAD, (m), NULL)
#define SSL_set_tlsext_host_name(s, name) \
    SSL_ctrl(s, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name, (void *)(name))

/* libssl */
const SSL_METHOD *TLS_client_method(void);
const SSL_METHOD *TLS_server_method(void);
SSL_CTX *SSL_CTX_new(const SSL_METHOD *meth);
void SSL_CTX_free(SSL_CTX *ctx);
uint64_t SSL_CTX_set_options(SSL_CTX *ctx, uint64_t op);
void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, SSL_verify_cb callback);
int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *CAfile, const char *CApath);
int SSL_CTX_set_default_verify_paths(SSL_CTX *ctx);
int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file);
int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type);
int SSL_CTX_check_private_key(const SSL_CTX *ctx);
int SSL_CTX_set_cipher_list(SSL_CTX *ctx, const char *str);
int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *str);
int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets);
void SSL_CTX_set_default_read_buffer_len(SSL_CTX *ctx, size_t len);
struct stack_st_X509_NAME *SSL_load_client_CA_file(const char *file);
void SSL_CTX_set_client_CA_list(SSL_CTX *ctx, struct stack_st_X509_NAME *name_list);
SSL *SSL_new(SSL_CTX *ctx);
void SSL_free(SSL *ssl);
int SSL_set_fd(SSL *s, int fd);
void SSL_set_connect_state(SSL *s);
void SSL_set_accept_state(SSL *s);
int SSL_set1_host(SSL *s, const char *hostname);
void SSL_set_hostflags(SSL *s, unsigned int flags);
X509_VERIFY_PARAM *SSL_get0_param(SSL *ssl);
int SSL_do_handshake(SSL *s);
BIO *SSL_get_rbio(const SSL *s);
int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes);
int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written);
int SSL_shutdown(SSL *s);
int SSL_get_error(const SSL *s, int ret_code);
int SSL_has_pending(const SSL *s);
long SSL_get_verify_result(const SSL *ssl);
const char *SSL_get_version(const SSL *s);
const SSL_CIPHER *SSL_get_current_cipher(const SSL *s);
const char *SSL_CIPHER_get_name(const SSL_CIPHER *c);
X509 *SSL_get1_peer_certificate(const SSL *s);

/* libcrypto */
uint64_t BIO_number_read(BIO *bio);
unsigned long ERR_get_error(void);
void ERR_clear_error(void);
void ERR_error_string_n(unsigned long e, char *buf, size_t len);
const char *ERR_reason_error_string(unsigned long e);
void CRYPTO_free(void *ptr, const char *file, int line);
#define OPENSSL_free(addr) CRYPTO_free(addr, __FILE__, __LINE__)
int X509_VERIFY_PARAM_set1_ip_asc(X509_VERIFY_PARAM *param, const char *ipasc);
const char *X509_verify_cert_error_string(long n);
void X509_free(X509 *a);
X509_NAME *X509_get_subject_name(const X509 *a);
int X509_NAME_get_index_by_NID(const X509_NAME *name, int nid, int lastpos);
X509_NAME_ENTRY *X509_NAME_get_entry(const X509_NAME *name, int loc);
ASN1_STRING *X509_NAME_ENTRY_get_data(const X509_NAME_ENTRY *ne);
void *X509_get_ext_d2i(const X509 *x, int nid, int *crit, int *idx);
void *GENERAL_NAME_get0_value(const GENERAL_NAME *a, int *ptype);
void GENERAL_NAMES_free(GENERAL_NAMES *a);
int ASN1_STRING_to_UTF8(unsigned char **out, const ASN1_STRING *in);
int ASN1_STRING_length(const ASN1_STRING *x);
const unsigned char *ASN1_STRING_get0_data(const ASN1_STRING *x);
int OPENSSL_sk_num(const OPENSSL_STACK *st);
void *OPENSSL_sk_value(const OPENSSL_STACK *st, int i);
#define sk_GENERAL_NAME_num(sk) OPENSSL_sk_num((const OPENSSL_STACK *)(sk))
#define sk_GENERAL_NAME_value(sk, idx) \
    ((GENERAL_NAME *)OPENSSL_sk_value((const OPENSSL_STACK *)(sk), (idx)))
#endif

#endif
